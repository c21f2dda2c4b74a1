"""Training-free ensembles of heterogeneous LLMs: members, fusers (Single, DeePEn, SpecFuse)."""
from ensemble.config import DecodeParams
from ensemble.fusers import DeePEn, FinishReason, FusedOutput, LabelOutput, MemberStats, Single, SpecFuse
from ensemble.members import Member, RowBatch
from ensemble.models import load_member

__all__ = [
    "DecodeParams", "DeePEn", "FinishReason", "FusedOutput", "LabelOutput", "Member", "MemberStats", "RowBatch",
    "Single", "SpecFuse", "load_member",
]
