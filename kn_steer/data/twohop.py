"""Two-hop factual chains (``../shared/data/twohop/twohop_en.jsonl``, built from English mLAMA).

Each line joins two facts on a bridge entity: ``e1 --r1--> e2 --r2--> e3`` (soppressata, country
of origin, Italy; Italy, capital, Rome), with each hop's cloze prompt (``hop1_prompt``: the cloze
cut before ``[Y]``; null where ``[Y]`` is not at the end) and the composed question
(``twohop_prompt``: "The capital of the country of origin of soppressata is") whose answer is
``e3``. ``shortcut_answer_in_e1`` marks chains whose answer is spelled inside ``e1``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kn_steer.data.common import read_jsonl
from kn_steer.errors import DataError


class TwoHopChain(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    id: str
    r1: str
    r2: str
    e1: str = Field(min_length=1)
    e2: str = Field(min_length=1)
    e3: str = Field(min_length=1)
    hop1_prompt: str | None = None
    hop2_prompt: str | None = None
    twohop_prompt: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    shortcut: bool = Field(False, alias="shortcut_answer_in_e1")

    @property
    def pair(self) -> str:
        return f"{self.r1}-{self.r2}"

    @property
    def prompt_ended(self) -> bool:
        """Both hops are clozes that end at the answer (scorable as next-token prompts)."""
        return bool(self.hop1_prompt) and bool(self.hop2_prompt)


def load_twohop(path: str | Path) -> list[TwoHopChain]:
    """Every chain of a two-hop JSONL file (errors name the line and field)."""
    path = Path(path)
    chains = []
    for line, record in read_jsonl(path, "two-hop file"):
        try:
            chains.append(TwoHopChain.model_validate(record))
        except ValidationError as exc:
            err = exc.errors()[0]
            raise DataError(f"{path}:{line}: field {'.'.join(map(str, err['loc']))!r}: {err['msg']}") from None
    if not chains:
        raise DataError(f"{path}: no two-hop chains")
    return chains
