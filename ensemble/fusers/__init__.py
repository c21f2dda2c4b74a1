"""Fusers: one file per method behind one interface (see base.py)."""
from ensemble.fusers.base import FinishReason, FusedOutput, Fuser, LabelOutput, MemberStats
from ensemble.fusers.single import Single

__all__ = ["FinishReason", "FusedOutput", "Fuser", "LabelOutput", "MemberStats", "Single"]
