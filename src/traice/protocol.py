"""The wire protocol between workers, the server and dashboards, defined once.

Every frame is one JSON object with a ``type``. Worker → server: ``hello``, ``sample``,
``round``, ``bye``, ``command_ack``. Server → worker: ``ack``, ``error``, ``command``. Both ends validate
with the models below; ``docs/protocol.md`` describes the same messages for people.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

PROTOCOL_VERSION = 1
#: Largest frame the server accepts; larger frames close the socket with 1009.
MAX_FRAME_BYTES = 1024 * 1024

#: Largest values of the SQL integer columns (PostgreSQL's INTEGER and BIGINT); larger ones are refused
#: as ``invalid_message`` rather than failing in the database.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# Physical bounds, far above any worker (a megawatt, a gigawatt-hour per report, a year in 3,000
# years' time): a finite but absurd value such as 1e308 would overflow the run's sums to infinity.
Watts = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]
Kwh = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]
Seconds = Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
#: Strings the server stores as text: PostgreSQL cannot hold a NUL character, so none may have one.
NO_NUL = r"^[^\x00]*$"
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=NO_NUL)]
Seq = Annotated[int, Field(ge=0, le=INT64_MAX)]
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
MetricValue = Union[bool, int, Finite, Annotated[str, Field(max_length=1000)]]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- worker → server


class Hardware(_Message):
    """What the worker runs on, as codecarbon sees it."""

    os: str | None = None
    python: str | None = None
    cpu_model: str | None = None
    cpu_count: int | None = Field(default=None, ge=0)
    gpu_model: str | None = None
    gpu_count: int | None = Field(default=None, ge=0)
    ram_gb: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] | None = None
    #: How codecarbon gets CPU power: "rapl", "cpu_load" (TDP x load estimate), "constant" ...
    cpu_power_method: str | None = None


class Location(_Message):
    """Where the worker draws its electricity from."""

    country_iso_code: Annotated[str, Field(min_length=3, max_length=3, pattern=NO_NUL)] | None = None
    region: Annotated[str, Field(max_length=100, pattern=NO_NUL)] | None = None
    intensity_g_per_kwh: Annotated[float, Field(ge=0, le=10_000, allow_inf_nan=False)]  # coal is ~1,000
    intensity_source: Annotated[str, Field(max_length=200, pattern=NO_NUL)] | None = None
    #: Power usage effectiveness of the party's site, applied once to its measured energy.
    pue: Annotated[float, Field(ge=1.0, le=5.0, allow_inf_nan=False)] = 1.0


class Hello(_Message):
    """First frame on a worker socket: who is reporting, for which run."""

    type: Literal["hello"] = "hello"
    seq: Seq = 0
    protocol: int = PROTOCOL_VERSION
    run: Name
    #: Join exactly this run; unknown ids are refused (``unknown_run``).
    run_id: int | None = Field(default=None, ge=1, le=INT32_MAX)
    node_id: Name
    #: Random id of one worker incarnation; with ``seq`` it makes every report unique.
    session: Annotated[str, Field(min_length=8, max_length=64, pattern=NO_NUL)]
    role: Literal["client", "server"] = "client"
    rounds_planned: Count | None = None
    hardware: Hardware = Field(default_factory=Hardware)
    location: Location
    sdk_version: Annotated[str, Field(max_length=50, pattern=NO_NUL)] | None = None


class Sample(_Message):
    """Live power of the worker's machine (or process share) at time ``t``."""

    type: Literal["sample"] = "sample"
    seq: Seq
    t: Seconds  # unix time
    cpu_w: Watts = 0.0
    gpu_w: Watts = 0.0
    ram_w: Watts = 0.0

    @property
    def power_w(self) -> float:
        return self.cpu_w + self.gpu_w + self.ram_w


class Round(_Message):
    """Energy and model quality of one measured interval of a round."""

    type: Literal["round"] = "round"
    seq: Seq
    round: Count
    #: "train" and "evaluate" come from Flower; "round" is a whole round; "tail" is the energy
    #: measured after the last update, reported at stop so nothing is dropped; "idle" is a shared
    #: process's energy between two messages (duration 0: it is not the client's working time).
    phase: Literal["round", "train", "evaluate", "tail", "idle"] = "round"
    started_at: Seconds | None = None  # unix time
    duration_s: Seconds
    cpu_energy_kwh: Kwh = 0.0
    gpu_energy_kwh: Kwh = 0.0
    ram_energy_kwh: Kwh = 0.0
    energy_kwh: Kwh
    emissions_kg: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]
    accuracy: Finite | None = None
    loss: Finite | None = None
    num_examples: Count | None = None
    bytes_up: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    bytes_down: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    metrics: dict[Annotated[str, Field(max_length=200)], MetricValue] = Field(
        default_factory=dict, max_length=200
    )

    @model_validator(mode="after")
    def _energy_adds_up(self) -> Round:
        parts = self.cpu_energy_kwh + self.gpu_energy_kwh + self.ram_energy_kwh
        if parts > 0 and not math.isclose(parts, self.energy_kwh, rel_tol=1e-6, abs_tol=1e-12):
            raise ValueError("energy_kwh must equal cpu_energy_kwh + gpu_energy_kwh + ram_energy_kwh")
        return self


class Bye(_Message):
    """The worker is done. ``final`` from the FL server (role "server") ends the run."""

    type: Literal["bye"] = "bye"
    seq: Seq
    reason: Annotated[str, Field(max_length=500)] | None = None
    final: bool = False


class CommandAck(_Message):
    """Where a command stands at the worker: it has it, it took effect, or it could not."""

    type: Literal["command_ack"] = "command_ack"
    seq: Seq
    command_id: Annotated[int, Field(le=INT32_MAX)]
    status: Literal["acknowledged", "done", "failed"]
    detail: Annotated[str, Field(max_length=500, pattern=NO_NUL)] | None = None


WorkerMessage = Annotated[Union[Hello, Sample, Round, Bye, CommandAck], Field(discriminator="type")]
_worker_adapter: TypeAdapter[Hello | Sample | Round | Bye | CommandAck] = TypeAdapter(WorkerMessage)


# --------------------------------------------------------------------------- server → worker


class Ack(_Message):
    """Every worker message with ``seq`` at or below this one is stored (or refused)."""

    type: Literal["ack"] = "ack"
    seq: Seq
    run_id: int | None = None


class Error(_Message):
    """A refused message. ``seq`` names it when the frame could be read that far."""

    type: Literal["error"] = "error"
    code: str
    message: str
    seq: Seq | None = None


class Command(_Message):
    """An order to the worker (or the FL server) from the dashboard."""

    type: Literal["command"] = "command"
    command_id: int
    action: Literal["pause", "resume", "stop", "exclude", "include"]
    node_id: str | None = None


ServerMessage = Annotated[Union[Ack, Error, Command], Field(discriminator="type")]
_server_adapter: TypeAdapter[Ack | Error | Command] = TypeAdapter(ServerMessage)


# --------------------------------------------------------------------------- parsing


class ProtocolError(Exception):
    """A frame that cannot be accepted; ``code`` is sent to the peer in an ``error``."""

    def __init__(self, code: str, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.seq = seq

    def to_message(self) -> Error:
        return Error(code=self.code, message=self.message, seq=self.seq)


def _loads(frame: str | bytes) -> dict[str, Any]:
    try:
        data = json.loads(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("invalid_json", f"frame is not valid JSON: {exc}") from None
    except RecursionError:  # [[[[...]]]]: json gives up, and so does the server
        raise ProtocolError("invalid_json", "frame is nested too deeply") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_message", "a frame must be a JSON object")
    return data


def parse_worker_message(frame: str | bytes) -> Hello | Sample | Round | Bye | CommandAck:
    """Parse and validate one worker frame, or raise :class:`ProtocolError`."""
    data = _loads(frame)
    seq = data.get("seq")
    # Name the refused message only by a seq it could have (an error with seq -1 could not even be sent).
    seq = seq if type(seq) is int and 0 <= seq <= INT64_MAX else None
    if data.get("type") not in ("hello", "sample", "round", "bye", "command_ack"):
        raise ProtocolError("unknown_type", f"unknown message type {data.get('type')!r}", seq)
    try:
        # Strict: JSON has types, and "1" or true is not a number (both ends send real numbers).
        return _worker_adapter.validate_python(data, strict=True)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'][1:]) or 'message'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ProtocolError("invalid_message", problems, seq) from None


def parse_server_message(frame: str | bytes) -> Ack | Error | Command:
    """Parse one server frame (worker side)."""
    data = _loads(frame)
    try:
        return _server_adapter.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError("invalid_message", str(exc)) from None


def json_dumps(data: dict[str, Any]) -> str:
    """Serialise a plain message dict; NaN and infinity are refused, as the server would."""
    return json.dumps(data, allow_nan=False, separators=(",", ":"))


def dumps(message: BaseModel) -> str:
    """Serialise a message for the wire (no NaN: the models forbid it)."""
    return message.model_dump_json(exclude_none=True)
