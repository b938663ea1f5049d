"""``QAPolicy``: the thresholds QA decides by, validated once, immutable, and recorded (with ``version``) in every report.

Losses are mean negative log-likelihoods per completion token (nats), as ``lorafleet.training.evaluate``
computes them; every threshold below is in those units. The rules (``lorafleet.qa.rules``):

- ``user-holdout``: the candidate alone beats the previous live version alone on the user's holdout by at
  least ``delta`` (passes when there is no previous live version);
- ``no-regression``: on no evaluation set is the gated bank with the candidate worse than the gated bank as
  served before (with the previous live version) by more than ``epsilon``;
- ``gate-vs-best-member``: on no evaluation set is the gated bank with the candidate worse than its best single
  member alone by more than ``epsilon``;
- ``sanity`` (before any rule, ``lorafleet.qa.sanity``): besides the file checks, the weights lie within
  ``weight_bounds()`` and each module's update norm within ``min_update_norm``/``max_update_norm``;
- ``answers`` (reason code ``no-improvement``, ``lorafleet.qa.answers``): greedy answers on the candidate's own
  holdout beat the previous live version's (the base model's when there is none) by answer F1: a one-sided
  Wilcoxon signed-rank test at ``answer_confidence`` and a mean gain of at least ``answer_margin``; when too few
  answers changed for the test ever to reach the confidence, every answer at least as good, one better and a
  mean gain of at least ``few_answers_margin`` (``few changed answers``); with ``wrong_answer_weight`` > 0 an
  answer naming another question's fact counts against the candidate; a preference pair's answer is scored by its
  F1 to the chosen answer less its F1 to the rejected one, and may run to ``pair_answer_max_new_tokens``;
- ``training-answers`` (reason code ``answers-other-questions``): greedy answers of the candidate on up to
  ``training_answers`` examples of the feedback its job trained on: at most ``max_training_wrong_share`` of them
  may answer another question (a candidate trained on answers misaligned with their questions, which the
  holdout's few answers cannot tell from a good one);
- ``general-facts`` (reason code ``general-facts-lost``, ``lorafleet.qa.facts``): of up to ``general_facts``
  general questions with known answers (none by default), the candidate alone still answers right at least
  ``min_general_facts_kept`` of those the base answers right (passes when the base answers none right); a candidate
  trained on preference pairs is read on all the general questions it answered (``looping_questions``) with
  ``preference_facts_kept``;
- ``looping-answers`` (reason code ``answers-loop``; a candidate trained on preference pairs): its greedy answers
  (holdout, and ``looping_questions`` general questions) loop (``answers.loops``) on at most
  ``max_looping_increase`` more of them than the reference's (the previous live version's, the base's);
- ``finite-outputs``: no logit of the candidate (scoring or decoding, alone, gated or paired) is NaN or infinite;
- **blame** (rechecks only): a live personal adapter that fails in a bank a task member changed is not
  rolled back when the bank without that member passes: the member is the culprit (``blame_action``);
- ``probe``: the probe set's loss moves less than ``epsilon_probe`` (by default the backbone's measured bound) from
  the base model's (either way, or only
  upwards with ``probe_one_sided``), for the candidate alone and for the gated bank with the candidate; a candidate
  trained on preference pairs is read on the answers' body (its openings and closings are its style).

Invalid values raise :class:`lorafleet.errors.ValidationError`, never pydantic's own error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from lorafleet.errors import ValidationError
from lorafleet.registry.weight_sanity import WeightBounds
from lorafleet.training.config import invalid_fields

DEFAULT_POLICY_VERSION = "qa-policy/7"


class QAPolicy(BaseModel):
    """Thresholds, budgets and seeds of QA; a report stores the whole policy next to ``version``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: a name for this set of values; bump it whenever a value changes so reports stay comparable
    version: str = Field(default=DEFAULT_POLICY_VERSION, min_length=1, max_length=64)
    #: required improvement of the candidate over the previous live version on the user's holdout (nats)
    delta: float = Field(default=0.0, ge=0.0, le=10.0, allow_inf_nan=False)
    #: largest allowed regression of an evaluation set (nats)
    epsilon: float = Field(default=0.05, ge=0.0, le=10.0, allow_inf_nan=False)
    #: largest allowed move of the probe set's loss away from the base model's (nats); ``None`` (the default)
    #: takes the backbone's measured bound (``lorafleet.qa.probe.probe_epsilon_for``): 0.25 on a pretrained
    #: backbone (calibrated on SmolLM2-135M: good adapters moved it 0.06-0.10, harmful ones 0.46-1.9), 0.75 on
    #: the built-in random-init tiny one, where every trained adapter lowers it 0.4-0.5 nats by learning byte
    #: statistics
    epsilon_probe: float | None = Field(default=None, ge=0.0, le=10.0, allow_inf_nan=False)
    #: count only moves that make the probe worse (an adapter may improve general text, e.g. on a weak base)
    probe_one_sided: bool = False
    #: at most this many other bank members are evaluated (further capped by free bank slots); see matrix.py
    max_bank_members: int = Field(default=6, ge=1, le=62, strict=True)
    #: seed of every deterministic choice QA makes (member sampling, capping an evaluation set)
    sample_seed: int = Field(default=0, ge=0, le=2**63 - 1, strict=True)
    #: examples per evaluation set; larger sets are subsampled deterministically
    max_examples_per_set: int = Field(default=48, ge=1, le=10_000, strict=True)
    #: examples of the shipped probe set used (``lorafleet.qa.probe``)
    probe_size: int = Field(default=32, ge=1, le=63, strict=True)  # 63: every prompt of the set
    #: whether a candidate must pass the answer rule (``require``, the default) or its figures are only reported
    #: (``report``: the loss, probe and bank rules decide alone, as before answer evidence existed)
    answer_evidence: Literal["require", "report"] = "require"
    #: confidence of the answer rule's one-sided Wilcoxon signed-rank test (passes at p <= 1 - answer_confidence)
    answer_confidence: float = Field(default=0.95, gt=0.5, lt=1.0, allow_inf_nan=False)
    #: least gain in mean answer F1 (0..1) of the candidate's answers over the reference's
    answer_margin: float = Field(default=0.05, ge=0.0, le=1.0, allow_inf_nan=False)
    #: least gain in mean answer F1 when fewer answers changed than the test needs to reach its confidence (5 at
    #: 0.95): none may be worse and one must be better. On SmolLM2 (tests/benchmarks/bench_qa_real.py) good first
    #: versions gained 0.23-0.76 and adapters trained on another user's values 0.04-0.10
    few_answers_margin: float = Field(default=0.2, ge=0.0, le=1.0, allow_inf_nan=False)
    #: how much an answer closer to another question's target than its own counts against the candidate (0: not
    #: at all, it ties with an empty answer; 1: as much as a right answer counts for it); ``lorafleet.qa.answers``
    wrong_answer_weight: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    #: examples of the candidate's own training split (the feedback its job trained on) it also answers greedily,
    #: in the holdout's batch (0: none); the ``training-answers`` rule reads them
    training_answers: int = Field(default=16, ge=0, le=256, strict=True)
    #: the largest share of those answers that may answer another question (``lorafleet.qa.answers``: closer to
    #: another training question's target than to its own) before the candidate is rejected with
    #: ``answers-other-questions``
    max_training_wrong_share: float = Field(default=0.25, ge=0.0, le=1.0, allow_inf_nan=False)
    #: a candidate trained on preference pairs may loop on at most this share of its greedy answers more than the
    #: reference (``looping-answers``). On SmolLM2 at the services' defaults (one seed, 30 general questions, 64
    #: tokens) the base looped on 3 answers; a "detailed" adapter that answered "the City of the City of ..." on 8
    #: (+17 %), five other styles on 1-5 (-7 to +7 %). On QA's own 40 answers the same adapters gave +15 % (detailed)
    #: and +12.5 % (casual, signoff): one seed, not a calibrated bound (tests/benchmarks/README.md, "QA's answers rule
    #: on preference pairs")
    max_looping_increase: float = Field(default=0.1, ge=0.0, le=1.0, allow_inf_nan=False)
    #: general questions with known answers that a candidate trained on preference pairs and the base also answer
    #: for ``looping-answers`` (its holdout holds a handful of pairs: at 5 answers one loop is 20 %); read by the
    #: ``general-facts`` rule with ``preference_facts_kept``. 0: the holdout's answers alone
    looping_questions: int = Field(default=24, ge=0, le=24, strict=True)
    #: general questions with known answers (``lorafleet.qa.facts``) the base and the candidate alone answer
    #: greedily, in the holdout's batch; the ``general-facts`` rule reads them. 0 (the default): none, the rule
    #: passes. Off by default because on SmolLM2 the default personal recipe itself keeps only 36-79 % of what the
    #: base answers right ("The capital of Spain is Cusco.", the user's city; 9 first versions, 3 seeds), so at 0.8
    #: QA would reject every good first version (docs/qa.md); it costs about 5 s of decoding per candidate on 2
    #: CPU cores
    general_facts: int = Field(default=0, ge=0, le=24, strict=True)
    #: the least share of the questions the base answers right that the candidate must still answer right
    min_general_facts_kept: float = Field(default=0.8, ge=0.0, le=1.0, allow_inf_nan=False)
    #: the same bound for a candidate trained on preference pairs, which answers ``looping_questions`` general
    #: questions anyway: the ``general-facts`` rule reads all of them (or ``general_facts``, if more) with this
    #: bound, even when ``general_facts`` is 0. On SmolLM2 at the services' defaults (one seed, six style
    #: adapters, QA's 24 questions, 14 of them right for the base) the adapters kept 79-100 %; one trained at half
    #: the learning rate kept 50 % while passing every other rule ("The capital of Mexico is New York City.";
    #: tests/benchmarks/README.md, "QA's answers rule on preference pairs"). 0: off for such candidates
    preference_facts_kept: float = Field(default=0.7, ge=0.0, le=1.0, allow_inf_nan=False)
    #: an answer is decoded for at most the target's length in tokens plus this many, and never more than
    #: ``answer_max_new_tokens`` (greedy, one batch for both columns)
    answer_extra_tokens: int = Field(default=4, ge=0, le=64, strict=True)
    answer_max_new_tokens: int = Field(default=48, ge=1, le=512, strict=True)
    #: the cap for a preference pair's answer instead, when higher: room for the longer of its two sides, whose
    #: styles often differ only at the end (a sign-off, a closing line, a length)
    pair_answer_max_new_tokens: int = Field(default=96, ge=1, le=512, strict=True)
    #: greedy samples kept per cell for inspection, and their length in tokens
    samples_per_cell: int = Field(default=2, ge=0, le=16, strict=True)
    sample_max_new_tokens: int = Field(default=12, ge=1, le=256, strict=True)
    #: bounds on each adapted module's update norm ``scaling * ||B @ A||_F``
    min_update_norm: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    max_update_norm: float = Field(default=100.0, gt=0.0, allow_inf_nan=False)
    #: weight sanity (``lorafleet.registry.weight_sanity``), checked at import and in QA's sanity step: the
    #: LoRA scaling (``lora_alpha / r``), the largest |value| and the norm per rank component of A and B, and
    #: the largest |value| and the norm per rank component of the update ``scaling * B @ A``. Adapters trained
    #: at the defaults measure at most 2, 0.15, 0.80, 0.044 and 1.2; the most aggressive ones the trainer can
    #: make 32, 0.70, 2.5, 35 and 68 (docs/qa.md, "Weight sanity"); bf16/fp32 serving breaks near |update| 1e15
    max_lora_scaling: float = Field(default=1e4, gt=0.0, allow_inf_nan=False)
    max_abs_lora_weight: float = Field(default=1e3, gt=0.0, allow_inf_nan=False)
    max_lora_weight_norm: float = Field(default=1e4, gt=0.0, allow_inf_nan=False)
    max_abs_update: float = Field(default=1e3, gt=0.0, allow_inf_nan=False)
    max_update_norm_per_rank: float = Field(default=1e4, gt=0.0, allow_inf_nan=False)
    #: a task adapter's candidate is also evaluated in the banks of at most this many enrolled users (those
    #: with other live members first; ``lorafleet.qa.sampling.sample_enrolled``); every one must pass
    max_enrolled_users: int = Field(default=3, ge=0, le=64, strict=True)
    #: earlier versions tried (newest first) when a live version fails a recheck, before rolling back to none
    max_rollback_trials: int = Field(default=5, ge=0, le=100, strict=True)
    #: when a recheck fails, the bank is evaluated without each of at most this many task members (the one
    #: whose change queued the recheck first); one whose removal makes the bank pass is the culprit
    max_blame_trials: int = Field(default=3, ge=0, le=62, strict=True)
    #: what QA does to a culprit task member: ``unenrol`` the user from it (the task stays live for its other
    #: users), or ``rollback-task`` (its live version goes back one, which rechecks every enrolled user)
    blame_action: Literal["unenrol", "rollback-task"] = "unenrol"
    #: give a personal candidate without a routing key or claim both, from its training prompts (else the centroid
    #: gate ignores it, or judges it by the nearest general prompt)
    compute_missing_routing_key: bool = True
    max_seq_len: int = Field(default=256, ge=8, le=32_768, strict=True)
    batch_size: int = Field(default=64, ge=1, le=4096, strict=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except PydanticValidationError as exc:
            raise invalid_fields(exc, what="QA policy", whole="policy") from None
        if self.min_update_norm > self.max_update_norm:
            raise ValidationError("invalid QA policy: min_update_norm is above max_update_norm")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> QAPolicy:
        """Build from a mapping (settings, a job's JSON); unknown keys and bad values raise ValidationError."""
        if data is not None and not isinstance(data, Mapping):
            raise ValidationError(f"QA policy must be an object, got {type(data).__name__}")
        return cls(**dict(data or {}))

    def weight_bounds(self) -> WeightBounds:
        """The weight-sanity bounds of this policy (imports are held to them too)."""
        return WeightBounds(
            max_scaling=self.max_lora_scaling,
            max_abs_factor=self.max_abs_lora_weight,
            max_factor_norm=self.max_lora_weight_norm,
            max_abs_delta=self.max_abs_update,
            max_delta_norm=self.max_update_norm_per_rank,
        )

    def for_probe_bound(self, epsilon_probe: float) -> QAPolicy:
        """This policy with ``epsilon_probe`` filled in when it was left to the backbone (``None``)."""
        return self if self.epsilon_probe is not None else self.with_changes(epsilon_probe=epsilon_probe)

    def with_changes(self, **changes: Any) -> QAPolicy:
        """A validated copy with some fields changed."""
        return QAPolicy(**{**self.model_dump(), **changes})


__all__ = ["DEFAULT_POLICY_VERSION", "QAPolicy"]
