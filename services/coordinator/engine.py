"""Generation through the swarm with the Petals client (synchronous; the API runs it in worker threads).

``SwarmModel`` holds one model's Petals client (tokenizer, local embeddings and LM head, remote blocks).
``SwarmModel.start(...)`` returns a ``Generation``: an iterator of ``TokenDelta`` that steps one inference
session token by token, meters every server step into a ``WorkMeter`` and stops on max_tokens, EOS, a stop
sequence or cancellation. Both conform to services/coordinator/engine_protocol.py (the serving layer's seam).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator, Optional

from services.common import petals_adapter  # must precede petals (importing it applies the fixes)
from services.common.packed_linear import PackedHead
from services.common.states import FinishReason
from services.common.swarm import dht_prefix_for
from services.coordinator.engine_protocol import TokenDelta  # noqa: F401  (the seam's types; re-exported)
from services.coordinator.lm_head import DEFAULT_MAX_WAIT_S, LogitsBatcher
from services.coordinator.metering import WorkMeter
from services.coordinator.sampling import SamplingParams, TextStream, TokenSampler


def end_of_generation_ids(tokenizer, generation_config) -> frozenset[int]:
    """Tokens that end a generation: the tokenizer's EOS (a chat model's end-of-turn, e.g. ``<|im_end|>``) and
    every ``eos_token_id`` of the model's generation config (e.g. ``<|endoftext|>``)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, (list, tuple)) else [configured]))
    return frozenset(ids)


class AvoidPeers:
    """The peers a stream avoids (``petals_adapter.observe(avoid=...)``): its own suspects and the quarantined."""

    def __init__(self, quarantined: set):
        self.own: set[str] = set()
        self.quarantined = quarantined

    def add(self, peer_id: str) -> None:
        self.own.add(peer_id)

    def __contains__(self, peer_id) -> bool:
        return peer_id in self.own or peer_id in self.quarantined

    def __bool__(self) -> bool:
        return bool(self.own or self.quarantined)


class SwarmModel:
    def __init__(self, model_id: str, model_path: str | Path, initial_peers: list[str], *,
                 request_timeout: float = 30.0, max_retries: Optional[int] = None, update_period: float = 15.0,
                 min_backoff: float = 0.5, step_budget_factor: float = petals_adapter.DEFAULT_STEP_BUDGET_FACTOR,
                 step_budget_floor_s: float = petals_adapter.DEFAULT_STEP_BUDGET_FLOOR_S,
                 lm_head_wait_s: float = DEFAULT_MAX_WAIT_S):
        from petals import AutoDistributedModelForCausalLM
        from transformers import AutoTokenizer

        from services.models.hub import hub_errors_explained

        self.model_id = model_id
        self.model_path = str(model_path)  # a local directory or a Hugging Face hub name (downloaded here)
        with hub_errors_explained(self.model_path):
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            self.model = self._load_client(AutoDistributedModelForCausalLM, initial_peers, request_timeout,
                                           max_retries, update_period, min_backoff)
        self.model.eval()
        config = self.model.config
        self.num_blocks: int = config.num_hidden_layers
        self.context_length: int = config.max_position_embeddings
        self.eos_token_ids: frozenset[int] = end_of_generation_ids(self.tokenizer, self.model.generation_config)
        self.generation_config = self.model.generation_config  # its recommended sampling (sampling_defaults)
        # every generation's logits come from one LM-head pass per round (services/coordinator/lm_head.py)
        # on a oneDNN-packed copy of the head where it can be (float32 on CPU: services/common/packed_linear.py)
        self.logits_batcher = LogitsBatcher(PackedHead(self.model.lm_head), max_wait_s=lm_head_wait_s)
        self.failure_listeners: list = []  # called with the peer ID of every failed server request
        # called with every failover event of any generation (petals_adapter: peer_id, blocks, cause, error,
        # replaced_by, stall_s), from the generation's thread
        self.failover_listeners: list = []
        self.spot_checker = None  # services/coordinator/verification.SpotChecker, when spot checks are on
        self.quarantined: set[str] = set()  # peers no generation routes through (failed spot checks)
        manager = self.sequence_manager
        petals_adapter.configure_step_budget(manager, step_budget_factor, step_budget_floor_s)
        petals_adapter.listen_request_failures(manager, self._request_failed)

    def _request_failed(self, peer_id) -> None:
        for listener in self.failure_listeners:
            listener(peer_id)

    def quarantine(self, peer_id: str) -> None:
        """Stop routing through ``peer_id``: blocked in every route refresh, and a reported failure (a ban) drops
        it from the current routes at once (``petals_adapter.block_peer``); running streams leave it at their
        next step (their ``avoid`` set)."""
        self.quarantined.add(peer_id)
        if self.spot_checker is not None:
            self.spot_checker.quarantined.add(peer_id)
        petals_adapter.block_peer(self.sequence_manager, peer_id)

    def unquarantine(self, peer_id: str) -> None:
        """Route through ``peer_id`` again (its quarantine was lifted, ``far-mesh nodes unquarantine``): unblocked,
        its ban cleared, and a route refresh started so it is back in the routes at once
        (``petals_adapter.unblock_peer``)."""
        self.quarantined.discard(peer_id)
        if self.spot_checker is not None:
            self.spot_checker.quarantined.discard(peer_id)
        petals_adapter.unblock_peer(self.sequence_manager, peer_id)

    def _load_client(self, auto_class, initial_peers, request_timeout, max_retries, update_period, min_backoff):
        import torch

        return auto_class.from_pretrained(
            self.model_path,
            initial_peers=initial_peers,
            dht_prefix=dht_prefix_for(self.model_id),
            request_timeout=request_timeout,
            max_retries=max_retries,
            update_period=update_period,
            min_backoff=min_backoff,
            torch_dtype=torch.float32,
        )

    @property
    def dht(self):
        return self.sequence_manager.dht

    @property
    def sequence_manager(self):
        return self.model.transformer.h.sequence_manager

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)

    def start(self, prompt_ids: list[int], params: SamplingParams, meter: WorkMeter,
              cancel: Optional[threading.Event] = None) -> "Generation":
        return Generation(self, prompt_ids, params, meter, cancel or threading.Event())

    def shutdown(self) -> None:
        try:
            self.sequence_manager.shutdown()
        except Exception:
            pass
        dht = getattr(self.sequence_manager, "dht", None)
        if dht is not None:
            dht.shutdown()


class Generation:
    def __init__(self, swarm: SwarmModel, prompt_ids: list[int], params: SamplingParams, meter: WorkMeter,
                 cancel: threading.Event):
        self.swarm = swarm
        self.prompt_ids = prompt_ids
        self.params = params
        self.meter = meter
        self.cancel = cancel
        self.sampler = TokenSampler(params, prompt_ids)
        self.text = TextStream(swarm.tokenizer, params.stop)
        self.token_ids: list[int] = []
        self.finish_reason: Optional[str] = None
        self.failovers: list[dict] = []  # servers replaced during this generation (see petals_adapter)
        self.session_id: Optional[str] = None  # the session row (set by the serving layer), for spot checks
        self.avoid = AvoidPeers(swarm.quarantined)  # suspects of failed spot checks: the stream leaves them
        self._session = None

    def _on_failover(self, event: dict) -> None:
        self.failovers.append(event)
        for listener in self.swarm.failover_listeners:
            listener(event)

    def replaced_servers(self) -> list[dict]:
        """The servers replaced so far: [{peer_id, blocks, cause, replaced_by, stall_ms}] (replaced_by is None
        when no live server could take the blocks)."""
        return [{"peer_id": e["peer_id"], "blocks": e["blocks"], "cause": e["cause"], "replaced_by": e["replaced_by"],
                 "stall_ms": None if e["stall_s"] is None else round(e["stall_s"] * 1000, 1)}
                for e in list(self.failovers)]

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def route(self) -> list[dict]:
        """The servers of the current inference session: [{peer_id, blocks}]."""
        session = self._session
        if session is None:
            return []
        return [{"peer_id": hop.peer_id, "blocks": hop.blocks} for hop in petals_adapter.route(session)]

    def __iter__(self) -> Iterator[TokenDelta]:
        import torch

        model = self.swarm.model
        batcher = self.swarm.logits_batcher
        max_length = len(self.prompt_ids) + self.params.max_tokens
        member = batcher.join()
        try:
            with torch.inference_mode(), model.inference_session(max_length=max_length) as session:
                self._session = session
                checker = self.swarm.spot_checker
                petals_adapter.observe(
                    session, on_step=self.meter.observe_span, on_failover=self._on_failover, avoid=self.avoid,
                    on_span_output=None if checker is None else lambda server_session, outputs: checker.offer(
                        server_session, outputs, session_id=self.session_id, avoid=self.avoid))
                inputs = torch.tensor([self.prompt_ids], dtype=torch.long)
                while True:
                    if self.cancel.is_set():
                        self.finish_reason = FinishReason.CANCELLED
                        return
                    # embeddings, the remote blocks (this session's servers) and the final norm; the LM head only
                    # for the last position, in one pass with the other generations' (lm_head.py)
                    hidden = model.transformer(input_ids=inputs).last_hidden_state[0, -1]
                    if self.cancel.is_set():  # the step finished after a cancel: its token is not used
                        self.finish_reason = FinishReason.CANCELLED
                        return
                    logits = batcher.logits(member, hidden)
                    token_id = self.sampler.sample(logits)
                    self.token_ids.append(token_id)
                    delta, finish = self.text.accept(token_id, count=len(self.token_ids),
                                                     max_tokens=self.params.max_tokens,
                                                     end_of_generation=token_id in self.swarm.eos_token_ids)
                    if delta is not None:
                        yield TokenDelta(len(self.token_ids), token_id, delta, self.sampler.last_logprob)
                    if finish is not None:
                        self.finish_reason = finish
                        return
                    inputs = torch.tensor([[token_id]], dtype=torch.long)
        finally:
            batcher.leave(member)
