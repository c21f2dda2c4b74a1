"""Fusers: one file per method behind one interface (see base.py)."""
from ensemble.fusers.base import FinishReason, FusedOutput, Fuser, LabelOutput, MemberStats
from ensemble.fusers.deepen import DeePEn
from ensemble.fusers.single import Single
from ensemble.fusers.specfuse import SpecFuse

__all__ = ["DeePEn", "FinishReason", "FusedOutput", "Fuser", "LabelOutput", "MemberStats", "Single", "SpecFuse"]
