"""The HTTP backend: measures read from a running ``kn-steer serve`` through its completions route.

Why: before a set goes on live traffic, a team asks what it does *on the server that will serve
it* (its masks, dtype, kernels and dose limits), not on an offline reference. Every measure here is
read from prompt log-probabilities: each row of token ids is sent as a completions prompt with
``prompt_logprobs=0``, so vLLM returns, for every prompt token, its log-probability given the tokens
before it and its rank. The steering travels in the request's ``kn_steer`` field as any client's
would, and applies at every scored position because every scored token is a prompt token.

Token ids are made here with the model's own tokenizer (:mod:`kn_steer.tokens`), so the server must
serve the model prepared on this machine: its fingerprint is checked against the server's.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

from kn_steer.data import ChoiceItem
from kn_steer.errors import KnSteerError
from kn_steer.eval.scoring import EncodedItem, ItemScore, encode_items
from kn_steer.eval.vllm_backend import choice_rows, item_scores
from kn_steer.models import load_tokenizer, resolve_model
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import NeuronSet
from kn_steer.steering.spec import SteeringSpec
from kn_steer.tokens import continuation_ids, prompt_ids

SETS_PATH = "/v1/kn_steer/sets"


class ServerEvaluator:
    """A client of one kn-steer server that scores choices, text and fact prompts under any spec."""

    backend = "server"
    cache = None  # the server is the measurement: nothing is reused from another backend's cache

    def __init__(self, url: str, api_key: str | None = None, model: str | Path | None = None,
                 rows_per_request: int = 16, concurrency: int = 4, timeout: float = 600.0):
        """Connect to ``url`` (``http://host:port``, with or without ``/v1``) and check that it
        steers the model ``model`` (default: the one it names) as prepared here."""
        import httpx

        self.url = url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.rows_per_request = rows_per_request
        self.concurrency = concurrency
        listing = self._get(SETS_PATH)
        if not listing.get("enabled"):
            raise KnSteerError(f"the server at {self.url} does not steer: {listing.get('reason')}")
        identity = listing.get("model") or {}
        self.ref = resolve_model(model if model is not None else identity.get("name", ""))
        if identity.get("fingerprint") != self.ref.fingerprint:
            raise KnSteerError(
                f"the server at {self.url} serves {identity.get('name')!r} (fingerprint "
                f"{str(identity.get('fingerprint'))[:12]}), not the model prepared here as {self.ref.name!r} "
                f"({self.ref.fingerprint[:12]}): token ids made here would not be the server's")
        self.model_id = self._served_model()
        self.tokenizer = load_tokenizer(self.ref)
        from transformers import AutoConfig

        self.shape = ModelShape.from_config(AutoConfig.from_pretrained(self.ref.path))
        self._sets: dict[str, NeuronSet] = {}

    # ----- HTTP --------------------------------------------------------------------------------
    def _answer(self, response: Any) -> Any:
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - not vLLM's error shape: show the body
                message = response.text[:500]
            raise KnSteerError(f"{self.url}{response.request.url.path} answered {response.status_code}: {message}")
        return response.json()

    def _get(self, path: str) -> Any:
        import httpx

        try:
            return self._answer(self._http.get(path))
        except httpx.HTTPError as exc:
            raise KnSteerError(f"cannot reach a kn-steer server at {self.url}: {exc}") from None

    def _served_model(self) -> str:
        models = self._get("/v1/models")["data"]
        bases = [m["id"] for m in models if not m.get("parent")]
        if not bases:
            raise KnSteerError(f"the server at {self.url} lists no base model")
        return bases[0]

    def close(self) -> None:
        self._http.close()

    @property
    def sets(self) -> Mapping[str, NeuronSet]:
        """The server's sets, fetched whole on first use (a control copies a set's neurons)."""
        return _ServerSets(self)

    def _fetch_set(self, name: str) -> NeuronSet:
        if name not in self._sets:
            self._sets[name] = NeuronSet.model_validate(self._get(f"{SETS_PATH}/{name}"))
        return self._sets[name]

    # ----- log-probabilities of token rows -----------------------------------------------------
    def token_logprobs(self, rows: Sequence[Sequence[int]], spec: SteeringSpec | Mapping[str, Any] | None
                       ) -> list[list[tuple[float, int]]]:
        """Per row, (log-probability, rank) of each token given the ones before it; the first
        token has none and reads (0.0, 0). Rank 1 is the argmax."""
        steering = None
        if spec is not None:
            steering = spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, SteeringSpec) else dict(spec)
        chunks = [list(rows[i:i + self.rows_per_request]) for i in range(0, len(rows), self.rows_per_request)]

        def send(chunk: list[Sequence[int]]) -> list[list[tuple[float, int]]]:
            body: dict[str, Any] = {"model": self.model_id, "prompt": [list(r) for r in chunk], "max_tokens": 1,
                                    "temperature": 0.0, "prompt_logprobs": 0}
            if steering is not None:
                body["kn_steer"] = steering
            import httpx

            try:
                answer = self._answer(self._http.post("/v1/completions", json=body))
            except httpx.HTTPError as exc:
                raise KnSteerError(f"request to {self.url}/v1/completions failed: {exc}") from None
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            return [_row_logprobs(row, c["prompt_logprobs"]) for row, c in zip(chunk, choices)]

        with ThreadPoolExecutor(self.concurrency) as pool:
            return [row for part in pool.map(send, chunks) for row in part]

    # ----- the measures ------------------------------------------------------------------------
    def encode(self, items: Sequence[ChoiceItem]) -> list[EncodedItem]:
        return encode_items(self.tokenizer, items)

    def score(self, items: Sequence[Any], spec: SteeringSpec | Mapping[str, Any] | None = None,
              progress: bool = False, calibrate: bool = True) -> list[ItemScore]:
        """Choice scores as :func:`kn_steer.eval.scoring.score_hf` computes them."""
        encoded = [e for e in items if isinstance(e, EncodedItem)]
        if len(encoded) != len(items):
            encoded = self.encode(items)
        rows, where = choice_rows(encoded, calibrate)
        logprobs = [[lp for lp, _ in row] for row in self.token_logprobs(rows, spec)]
        return item_scores(encoded, where, logprobs, calibrate)

    def text_nll(self, texts: Sequence[str], spec: Any, max_tokens: int) -> list[tuple[float, int]]:
        """(summed NLL, predicted tokens) per text, as :func:`kn_steer.eval.perplexity.text_nll`."""
        rows = [prompt_ids(self.tokenizer, t)[:max_tokens] for t in texts]
        return [(-sum(lp for lp, _ in row[1:]), len(row) - 1) for row in self.token_logprobs(rows, spec)]

    def prompt_correct(self, prompts: Sequence[str], targets: Sequence[str], spec: Any) -> list[bool]:
        """Whether each target's first token is the argmax after its prompt."""
        rows = [prompt_ids(self.tokenizer, p) + continuation_ids(self.tokenizer, t)[:1]
                for p, t in zip(prompts, targets)]
        return [row[-1][1] == 1 for row in self.token_logprobs(rows, spec)]


def _row_logprobs(row: Sequence[int], prompt_logprobs: Sequence[Mapping[str, Any] | None]) -> list[tuple[float, int]]:
    if len(prompt_logprobs) != len(row):
        raise KnSteerError(f"the server returned {len(prompt_logprobs)} prompt log-probabilities for {len(row)} tokens")
    out = [(0.0, 0)]
    for token, entry in zip(row[1:], prompt_logprobs[1:]):
        lp = entry[str(token)]  # JSON keys are strings; with prompt_logprobs=0 the prompt token is there
        out.append((float(lp["logprob"]), int(lp["rank"])))
    return out


class _ServerSets(Mapping[str, NeuronSet]):
    """The server's sets by name, each fetched when first asked for."""

    def __init__(self, ev: ServerEvaluator):
        self._ev = ev

    def __getitem__(self, name: str) -> NeuronSet:
        return self._ev._fetch_set(name)

    def __iter__(self):
        return iter(d["name"] for d in self._ev._get(SETS_PATH)["data"])

    def __len__(self) -> int:
        return len(self._ev._get(SETS_PATH)["data"])


__all__ = ["ServerEvaluator"]
