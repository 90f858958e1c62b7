"""Speculative decoding: the settings, the verification rules, and the per-request controller.

A draft proposer (a plugin: "ngram" built in) guesses the next k tokens; the engine runs the last
real token and the k guesses through the target model in one forward, then keeps the longest prefix
the target agrees with and one token of its own (Leviathan et al. 2023; Chen et al. 2023):

- greedy: accept guesses while each equals the target's argmax; then the target's argmax.
- sampling: accept guess d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection
  draw from normalize(max(0, p_i - q_i)); after k acceptances draw a bonus token from p_{k+1}.
  The tokens that come out are distributed exactly as the target's own samples. A proposer without
  a distribution (n-gram) is a point mass: q_i(d_i) = 1.

Each request adapts its k to its recent acceptance and pauses speculation while it does not pay.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from tandem.errors import ConfigError, InvalidRequestError

if TYPE_CHECKING:  # torch loads on use: SamplingParams (and the SDK) import this module
    import torch

MAX_K = 16
OFF = "none"
# Methods a request may choose when the operator names none: n-gram lookup loads nothing and costs
# a bounded scan (its options are the server's too).
DEFAULT_REQUEST_METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: a draft-proposer plugin name ("ngram", ...) or "none". k: most guesses per step.
    adaptive: grow and shrink k with the request's acceptance, and pause when nothing is accepted.
    options: the proposer's constructor options."""

    method: str = OFF
    k: int = 5
    adaptive: bool = True
    options: dict = field(default_factory=dict, hash=False)

    @classmethod
    def parse(cls, value) -> SpeculativeConfig | None:
        """None, {"method": "none"} -> None (off); a dict of the fields -> the config."""
        if value is None:
            return None
        if isinstance(value, SpeculativeConfig):
            return None if value.method == OFF else value
        if not isinstance(value, dict):
            raise InvalidRequestError(f"speculative must be None or a dict like {{'method': 'ngram', 'k': 5}}, "
                                      f"got {value!r}")
        unknown = sorted(set(value) - {"method", "k", "adaptive", "options"})
        if unknown:
            raise InvalidRequestError(f"speculative: unknown keys {unknown}; keys are method, k, adaptive, options")
        method, k = value.get("method", OFF), value.get("k", 5)
        adaptive, options = value.get("adaptive", True), value.get("options") or {}
        if not isinstance(method, str) or not method:
            raise InvalidRequestError(f"speculative method must be a proposer name or 'none', got {method!r}")
        if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_K):
            raise InvalidRequestError(f"speculative k must be an integer in [1, {MAX_K}], got {k!r}")
        if not isinstance(adaptive, bool) or not isinstance(options, dict):
            raise InvalidRequestError("speculative adaptive must be a bool and options a dict")
        return None if method == OFF else cls(method, k, adaptive, dict(options))

    @classmethod
    def parse_request(cls, value) -> SpeculativeConfig | None:
        """A request's choice: as parse, but without options. A proposer's options can load a model
        file, size a search or name an address, so only the operator's configuration sets them."""
        if isinstance(value, dict) and "options" in value:
            raise InvalidRequestError("speculative options come from the server's configuration; a request may "
                                      "choose only method, k and adaptive")
        return cls.parse(value)


@dataclass(frozen=True)
class SpeculativePolicy:
    """What the requests of one engine may choose. default: the engine's setting (requests that say
    nothing get it); methods: the proposers a request may pick (the default's always among them).
    A request's proposer gets the default's options when it picks the default's method, else
    the proposer's own defaults."""

    default: SpeculativeConfig | None = None
    methods: frozenset = frozenset(DEFAULT_REQUEST_METHODS)

    @classmethod
    def of(cls, default: SpeculativeConfig | None, methods=None) -> SpeculativePolicy:
        if methods is not None and not (isinstance(methods, (list, tuple, set, frozenset))
                                        and all(isinstance(m, str) and m for m in methods)):
            raise ConfigError(f"speculative_methods must be a list of proposer names, got {methods!r}")
        allowed = set(DEFAULT_REQUEST_METHODS if methods is None else methods)
        return cls(default, frozenset(allowed | ({default.method} if default else set())))

    def for_request(self, choice) -> SpeculativeConfig | None:
        """The config a request runs with; choice: SamplingParams.speculative."""
        if choice == "default":
            return self.default
        spec = SpeculativeConfig.parse_request(choice)
        if spec is None:
            return None
        if spec.method not in self.methods:
            raise InvalidRequestError(f"speculative method {spec.method!r} is not enabled on this server; "
                                      f"enabled: {', '.join(sorted(self.methods)) or 'none'}")
        same = self.default is not None and self.default.method == spec.method
        return replace(spec, options=dict(self.default.options) if same else {})


# -- verification ------------------------------------------------------------------------------
def verify_greedy(argmax: list[int], drafts: list[int]) -> tuple[int, int]:
    """argmax: the target's choice at each of len(drafts) + 1 rows. Returns (accepted, next token)."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == argmax[accepted]:
        accepted += 1
    return accepted, argmax[accepted]


def verify_sampled(probs: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None,
                   generator: torch.Generator) -> tuple[int, int]:
    """probs: the target's distributions (len(drafts) + 1, V); draft_probs: the proposer's (len(drafts), V),
    or None for a point mass on each draft. Returns (accepted, next token), distributed as the target's."""
    import torch
    for i, d in enumerate(drafts):
        p = probs[i]
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        u = float(torch.rand((), generator=generator))
        if q_d > 0 and u * q_d < float(p[d]):  # u < min(1, p/q), without dividing
            continue
        residual = p.clone() if draft_probs is None else (p - draft_probs[i]).clamp_(min=0)
        if draft_probs is None:
            residual[d] = 0
        total = float(residual.sum())
        if total <= 0:  # p == q: the residual is empty and any draw from p is right
            residual, total = p, float(p.sum())
        return i, int(torch.multinomial(residual / total, 1, generator=generator))
    return len(drafts), int(torch.multinomial(probs[len(drafts)], 1, generator=generator))


# -- per-request control -----------------------------------------------------------------------
@dataclass
class SpeculationState:
    """One request's speculation: its current k, what it proposed and got accepted, and a pause
    counter. Proposing costs the forward k extra rows; when rounds keep coming back empty the
    request stops proposing for a while, then tries again (the text may start repeating)."""

    config: SpeculativeConfig
    proposer: object = None  # the DraftProposer, resolved once when the request is added
    k: int = 0
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0  # verification rounds with at least one guess
    misses: int = 0  # consecutive rounds with nothing accepted
    paused: int = 0  # steps left without proposing
    PAUSE_AFTER = 4
    PAUSE_STEPS = 16

    def __post_init__(self) -> None:
        self.k = self.k or self.config.k

    def wants(self) -> int:
        """How many guesses to ask for this step (0: none)."""
        if self.paused:
            self.paused -= 1
            return 0
        return self.k

    def record(self, proposed: int, accepted: int) -> None:
        if not proposed:
            return
        self.proposed += proposed
        self.accepted += accepted
        self.rounds += 1
        if not self.config.adaptive:
            return
        if accepted == proposed:
            self.k = min(self.config.k, self.k + 1)
        elif accepted < proposed // 2:
            self.k = max(1, self.k // 2)
        self.misses = self.misses + 1 if accepted == 0 else 0
        if self.misses >= self.PAUSE_AFTER:
            self.paused, self.misses, self.k = self.PAUSE_STEPS, 0, self.config.k
