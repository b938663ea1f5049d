"""One exception hierarchy for lorafleet.

Every boundary (database, object store, file formats, Ray, HTTP) translates its own failures into one of
these, so callers catch ``LorafleetError`` subclasses and the API maps them to HTTP statuses in one place.
The ``code`` class attribute is a stable, machine-readable name used by the API and the SDK.
"""

from __future__ import annotations


class LorafleetError(Exception):
    """Base of every error lorafleet raises on purpose."""

    code = "lorafleet_error"


# --- configuration -------------------------------------------------------------------------------------
class ConfigError(LorafleetError):
    """A setting is missing or invalid; the message names the setting."""

    code = "config_error"


# --- lookups and conflicts -----------------------------------------------------------------------------
class NotFoundError(LorafleetError):
    """The thing does not exist *for this tenant* (another tenant's objects are reported the same way)."""

    code = "not_found"


class ModelNotFoundError(NotFoundError):
    """A generation request's ``model`` names nothing this tenant serves (OpenAI's ``model_not_found``)."""

    code = "model_not_found"


class AlreadyExistsError(LorafleetError):
    """A unique name or key is already taken."""

    code = "already_exists"


class ConflictError(LorafleetError):
    """The operation conflicts with the current state (e.g. an active job, a concurrent change)."""

    code = "conflict"


class InvalidStateError(ConflictError):
    """The object is in a state that does not allow this operation."""

    code = "invalid_state"


class QAUndecidedError(InvalidStateError):
    """A manual promote of a version QA has not passed, under the promote rule ``qa``, without ``force``."""

    code = "qa_undecided"


# --- input validation ----------------------------------------------------------------------------------
class ValidationError(LorafleetError):
    """Input was rejected before anything was written."""

    code = "validation_error"


class PayloadTooLargeError(ValidationError):
    """Input exceeds a configured size limit."""

    code = "payload_too_large"


class AuthError(LorafleetError):
    """Missing or invalid credentials."""

    code = "unauthorized"


class PermissionDeniedError(AuthError):
    """Valid credentials that may not do this."""

    code = "forbidden"


# --- adapters and files --------------------------------------------------------------------------------
class AdapterFormatError(ValidationError):
    """An adapter folder or file is not a valid PEFT-format safetensors adapter."""

    code = "adapter_format_error"


class UnsafeFormatError(AdapterFormatError):
    """A pickle-based file (.bin, .pt, .pkl, ...) was offered; lorafleet never loads pickle."""

    code = "unsafe_format"


class AdapterShapeError(AdapterFormatError):
    """Adapter tensors do not fit the model (wrong shapes, rank above the maximum, unknown modules)."""

    code = "adapter_shape_error"


class NonFiniteError(ValidationError):
    """Tensors or losses contain NaN or infinity."""

    code = "non_finite"


class BackboneMismatchError(ValidationError):
    """An adapter was made for another backbone (fingerprint differs)."""

    code = "backbone_mismatch"


class WeightBoundsError(ValidationError):
    """Finite adapter weights (or a ``lora_alpha``) beyond the sanity bounds: a diverged or tampered adapter
    that would overflow when served (``lorafleet.registry.weight_sanity``)."""

    code = "weights_out_of_bounds"


class TargetModuleError(ValidationError):
    """Target modules matched nothing in the model (never a silent base-only fallback)."""

    code = "target_module_error"


class MergeError(LorafleetError):
    """Merging or unmerging an adapter into base weights is not possible (e.g. a 4-bit base)."""

    code = "merge_error"


class GenerationError(LorafleetError):
    """One request's decoding failed (its adapters produced NaN or infinite logits, or sampling failed); the
    rest of its batch was served. Not the caller's fault; the message names the adapter versions."""

    code = "generation_failed"


class CapacityError(LorafleetError):
    """A bank, cache or queue has no free slot (everything is pinned or in use)."""

    code = "capacity_exhausted"


# --- object store --------------------------------------------------------------------------------------
class BlobStoreError(LorafleetError):
    """The object store failed (connection, permissions)."""

    code = "blob_store_error"


class BlobNotFoundError(BlobStoreError, NotFoundError):
    """No blob with this digest."""

    code = "blob_not_found"


class BlobIntegrityError(BlobStoreError):
    """A blob's bytes do not match its sha256 or size (corrupted or truncated)."""

    code = "blob_integrity_error"


# --- database ------------------------------------------------------------------------------------------
class StoreError(LorafleetError):
    """The metadata store failed in a way that is not the caller's fault."""

    code = "store_error"


class ReadOnlyTransactionError(StoreError):
    """A write in a read-only transaction (``Database.read``, ``session(read_only=True)``): a bug in the caller;
    nothing was written."""

    code = "read_only_transaction"


# --- jobs and training ---------------------------------------------------------------------------------
class JobError(LorafleetError):
    """A job could not be submitted or run."""

    code = "job_error"


class TrainingError(JobError):
    """Training failed (e.g. non-finite loss); nothing was registered."""

    code = "training_error"


class LeaseLostError(JobError):
    """This worker no longer holds the job's lease; it must stop without writing results."""

    code = "lease_lost"


class JobCancelledError(LeaseLostError):
    """A cancel was requested for this running job: its worker must stop without writing results, and the job
    ends ``cancelled`` (never retried). A lease loss, so code that stops on a lost lease stops here too."""

    code = "job_cancelled"


class JobFinishedError(InvalidStateError):
    """The job already finished (``state`` says how), so it cannot be cancelled any more."""

    code = "job_finished"

    def __init__(self, message: str, *, state: str = "") -> None:
        super().__init__(message)
        self.state = state


class QAError(LorafleetError):
    """A QA run could not be completed."""

    code = "qa_error"
