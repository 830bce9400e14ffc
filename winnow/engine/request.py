"""A request as the engine sees it: token ids plus the pooling parameters bound to one task."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from winnow.inputs.prompts import TokenizedPrompt
from winnow.params import PoolingParams


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt: TokenizedPrompt
    params: PoolingParams  # params.task is always set
    arrival_time: float = field(default_factory=time.monotonic)  # when it was submitted

    @property
    def num_tokens(self) -> int:
        return len(self.prompt.token_ids)
