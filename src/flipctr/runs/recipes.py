"""The recipes ``flipctr run`` runs through one pretraining loop and one finetuning runner: the
finetuned variants, the methods (FLIP and the CTRL and PTab baselines) and the paper's Table 5
ablations, each as the settings it fixes. Light on purpose: the command line reads it to offer
the choices."""

from __future__ import annotations

from dataclasses import dataclass, field

VARIANTS = ("scratch", "flip_id", "flip_plm", "flip")


@dataclass(frozen=True)
class Method:
    """A recipe of the one pretraining loop and finetuning runner (``flipctr run --method``): the
    objectives it fixes, the finetuned variants it may report, and their names there (the
    paper's Table 2 row, where it is not the variant's own)."""

    title: str
    objectives: dict[str, bool]
    variants: tuple[str, ...]
    reported: dict[str, tuple[str, str]] = field(default_factory=dict)  # variant -> (name, Table 2 key)
    trains_text: bool = False  # its pretraining trains the language model alone: a frozen one is refused

    def overrides(self) -> list[str]:
        return [f"flip.{key}={str(value).lower()}" for key, value in self.objectives.items()]


METHODS = {
    "flip": Method("FLIP", {}, VARIANTS),
    # CTRL: instance-level contrastive alignment alone, then the ID model finetuned alone
    "ctrl": Method("CTRL", {"mlm": False, "mtm": False, "icl": True}, ("scratch", "flip_id"),
                   {"flip_id": ("CTRL", "ctrl")}),
    # PTab: token-level MLM of the prompts (the text alone), then the language model finetuned for CTR
    "ptab": Method("PTab", {"mlm": True, "mtm": False, "icl": False, "joint_reconstruction": False,
                            "token_level_masking": True}, ("flip_plm",), {"flip_plm": ("PTab", "ptab")},
                   trains_text=True),
}


ABLATIONS = {  # paper Table 5, as switches of the same run
    "none": [],
    "no-mlm": ["flip.mlm=false"],
    "no-mtm": ["flip.mtm=false"],
    "no-icl": ["flip.icl=false"],
    "no-mlm-mtm": ["flip.mlm=false", "flip.mtm=false"],
    "no-pretraining": ["pretrain.epochs=0"],
    "token-masking": ["flip.token_level_masking=true"],
    "no-joint-reconstruction": ["flip.joint_reconstruction=false"],
}
