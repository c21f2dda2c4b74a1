"""Training-free ensembles of heterogeneous LLMs: members, fusers (Single, DeePEn, SpecFuse)."""
from ensemble.config import DecodeParams
from ensemble.fusers import FinishReason, FusedOutput, LabelOutput, MemberStats, Single
from ensemble.members import Member, RowBatch
from ensemble.models import load_member

__all__ = [
    "DecodeParams", "FinishReason", "FusedOutput", "LabelOutput", "Member", "MemberStats", "RowBatch",
    "Single", "load_member",
]
