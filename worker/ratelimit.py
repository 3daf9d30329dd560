"""The client-side budget of one Azure OpenAI deployment: TPM and RPM pacing, a 429 pause, and an
adaptive window on requests in flight.

How Azure limits a deployment: it charges each request its estimated prompt tokens + max_tokens when the
request arrives and admits at most a sixth of the per-minute quota (tokens and requests) in any 10 s
window; `x-ratelimit-remaining-tokens`/`-requests` say what is left of a window. Which window is not
documented: other servers (Microsoft's public simulator, some gateways) count remaining tokens over 60 s.

What the budget does, per deployment and per dimension (tokens, requests):

- **Limit.** `--tpm/--rpm` when configured; else *learned* from the headers of successful answers: what
  the server has left plus what this process itself sent in the window it counts is the capacity
  available to us (the median of the last few samples, lowered at once, raised over `LEARN_SECONDS`: it
  shrinks when another replica shares the quota). Over 10 s that is `(remaining + own 10 s usage) × 6` a
  minute; over 60 s, `remaining + own 60 s usage`. Which one is told per dimension: when this process's
  usage ages past 10 s, a 10 s `remaining` gives it back, and in a process's first minute, usage of
  others that comes back says 10 s too (`Dimension._tell_window`); a 429 asking to wait more than 10 s
  says a minute, for good. Until then, the lower reading (the higher one would overrun a
  minute-long window sixfold). What remains is claimed whole by a process alone, half of it when others
  use the quota too (`SHARED_CLAIM`), so that replicas do not all grab the same headroom at once; a
  process told that no other replica of the job is at work (`set_peers`, worker/peers.py) claims it
  whole at once, as the others' usage leaves the window. A 429's `remaining` only
  says the window is full now, so it teaches nothing. An `x-ratelimit-limit-*` header above 0, on any
  answer, is taken as the per-minute limit.
- **Pacing.** Requests are spaced at the limit's rate (≤ 1 s of burst) and a log of what was sent
  mirrors Azure's sliding window, kept `GUARD_SECONDS` longer than Azure's so that network-delay jitter
  cannot push a request into a full window: ~99 % of the quota, without 429s. (Pacing a minute's quota
  over 10 s windows never overruns a 60 s window either.)
- **AIMD on the rate.** A 429 is a signal the limit is lower than assumed (unknown, misconfigured,
  shared): the rate is cut to `DECREASE_FACTOR` × what was actually sent (× the limit when nothing was
  sent lately) and regained linearly, back to the known limit within `KNOWN_RECOVER_SECONDS`. With no
  limit known (a gateway strips the headers), what the last 10 s held when the 429 came is remembered as
  the ceiling: the cut is to `CEILING_DECREASE_FACTOR` of it, the rate returns to `PROBE_FRACTION` of it
  within `RECOVER_SECONDS`, then probes beyond it by `PROBE_PER_SECOND` of it a second until the next 429
  sets a new ceiling. With no limit known and nothing admitted lately (a first answer that is a 429)
  there is nothing to cut from: the rate stays unpaced. The server's retry-after pauses the whole
  deployment (`pause`).
- **Floors.** Neither a learned limit nor a cut goes below `MIN_REQUESTS_PER_MINUTE` requests a minute
  (in tokens: that many requests of the mean cost), so no answer can stop or starve a deployment.
- **Window on requests in flight** (`admit`): Little's law, the paced request rate × the observed
  latency × `LATENCY_HEADROOM` (+ `WINDOW_SLACK`), recomputed on every answer and 429, so that it follows
  a cut or a recovery of the rate at once (at 10-30 s latency, one more request per round trip would take
  minutes). Before a rate and a latency are known (unpaced), a slow-start window: it doubles every round
  trip while full, and halves on a 429. Never more than `max_window` (`--concurrency`).

Every decision reads the injected clock, so the behaviour is unit-tested on a fake one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol

DEFAULT_MAX_TOKENS = 16
WINDOW_FRACTION = 6  # Azure admits a sixth of the per-minute quota per 10 s window
WINDOW_SECONDS = 10.0
GUARD_SECONDS = 0.1  # the client-side window is this much longer than Azure's (1 % of the quota): it absorbs
# a difference in client-to-server delay of up to 100 ms between two requests 10 s apart
BURST_SECONDS = 1.0  # pacing lets through at most this much of the rate at once
DECREASE_FACTOR = 0.9  # a 429 cuts the rate to this fraction of what was being sent
KNOWN_RECOVER_SECONDS = 10.0  # then it returns linearly to the known limit in this time
INCREASE_PER_SECOND = (
    0.03  # with no known limit nor ceiling, it grows per second by this fraction of the cut rate
)
LEARN_SAMPLES = 5  # the learned capacity is the median of the last few header samples
PEAK_SECONDS = 300.0  # the most capacity ever seen fades with this time constant
SHARE_QUANTUM = 0.1  # others' use below this fraction of the capacity is noise
SHARED_CLAIM = 0.5  # the part of what remains a process claims when others use the quota too
MINUTE_SECONDS = 60.0  # some servers (and gateways, simulators) count remaining-* over a 60 s window
SHAPE_SAMPLES = 64  # header samples kept to tell which window `remaining` counts
SHAPE_EVIDENCE = 0.1  # own usage aged out of 10 s, as a fraction of the 10 s capacity, needed to decide
CEILING_DECREASE_FACTOR = 0.9  # without a known limit, the cut below the rate a 429 came at
RECOVER_SECONDS = 3.0  # without a known limit, a cut rate returns to near the last 429's rate this fast
PROBE_FRACTION = 0.97  # ... to this fraction of it,
PROBE_PER_SECOND = 0.003  # then probes beyond it by this fraction of it per second
LEARN_SECONDS = 5.0  # and rises toward a higher estimate with this time constant
MIN_REQUESTS_PER_MINUTE = 6.0  # Azure's smallest deployment (1K TPM) allows 6 RPM
MAX_ESTIMATE = 2**31  # a request's estimated cost never exceeds this many tokens
INITIAL_WINDOW = 8
MIN_WINDOW = 2
WINDOW_DECREASE = 0.5
LATENCY_HEADROOM = 2.0
WINDOW_SLACK = 1.0  # requests allowed in flight beyond what Little's law needs: the jitter of small numbers
LATENCY_WEIGHT = 0.1
DEFAULT_MAX_WINDOW = 4096

REMAINING_HEADERS = {"tokens": "x-ratelimit-remaining-tokens", "requests": "x-ratelimit-remaining-requests"}
LIMIT_HEADERS = {"tokens": "x-ratelimit-limit-tokens", "requests": "x-ratelimit-limit-requests"}


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def estimate_tokens(body: dict[str, Any]) -> int:
    """Tokens Azure's limiter charges a request: ≈ characters/4 of the input, plus max_tokens.

    Never raises, whatever the shape of the body: what is not text counts as nothing, a max_tokens that is
    not a number as the default, and the estimate is capped at `MAX_ESTIMATE`.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        chars = sum(_text_chars(message.get("content")) for message in messages if isinstance(message, dict))
    else:
        chars = _input_chars(body.get("input"))
    completion = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    if isinstance(completion, bool) or not isinstance(completion, int | float) or not completion >= 0:
        completion = DEFAULT_MAX_TOKENS  # NaN fails the comparison too
    return min(MAX_ESTIMATE, math.ceil(chars / 4) + int(min(completion, MAX_ESTIMATE)))


def _text_chars(content: object) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _input_chars(value: object) -> int:
    """Embeddings input: strings count by length, token ids as 4 characters each."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(
            len(item) if isinstance(item, str) else 4 * len(item) if isinstance(item, list) else 4
            for item in value
        )
    return 0


def _server_wait(headers: Mapping[str, str]) -> float | None:
    """The seconds a 429 asks to wait: `retry-after-ms`, else `retry-after` in seconds; None = neither."""
    milliseconds = _header_number(headers, "retry-after-ms")
    if milliseconds is not None:
        return milliseconds / 1000
    return _header_number(headers, "retry-after")


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number >= 0 and math.isfinite(number) else None  # Azure sends -1 for "not reported"


class Dimension:
    """One quota dimension (tokens or requests) of a deployment: its limit, pacing and usage log.

    Limits are per minute. The log holds what was admitted (at its scheduled start) over the last
    `WINDOW_SECONDS + GUARD_SECONDS`; `recent` is the part inside Azure's own window. A second log keeps
    the last `MINUTE_SECONDS` (`minute_total`), to learn from servers whose `remaining` counts a minute.
    """

    def __init__(self, configured: float | None) -> None:
        self.configured = configured
        self.learned: float | None = None
        self._learned_from_limit_header = False
        self._aimd_base: float | None = None
        self._aimd_at = 0.0
        self._ceiling: float | None = None  # no known limit: the rate the last 429 came at
        self._recent: deque[list[float]] = deque()  # [start, cost]
        self._old: deque[list[float]] = deque()
        self._minute: deque[list[float]] = deque()  # the same entries, over MINUTE_SECONDS
        self._samples: deque[float] = deque(maxlen=LEARN_SAMPLES)
        self._shapes: deque[tuple[float, float, float]] = deque(maxlen=SHAPE_SAMPLES)  # see _tell_window
        self.counts: float | None = None  # the window `remaining` counts (10 or 60 s); None = not known yet
        self.peers: int | None = None  # other worker processes at work on this job (worker/peers.py)
        self._minute_reading: float | None = None  # the last sample read as counting a minute
        self._peaks: list[float | None] = [None, None]  # the most capacity seen, per reading (10 s, 60 s)
        self._peaks_at = [0.0, 0.0]
        self._learned_at = -math.inf
        self.recent_total = 0.0
        self._old_total = 0.0
        self.minute_total = 0.0
        self._tat = -math.inf  # pacing: the theoretical time the next request may start
        self._last = -math.inf
        self._advanced = -math.inf
        self._first: float | None = None

    @property
    def known(self) -> float | None:
        """The configured limit, else the learned one."""
        return self.configured if self.configured is not None else self.learned

    def limit(self, now: float) -> float | None:
        """The per-minute rate to pace at now: the known limit, or below it after a 429; None = unpaced."""
        known = self.known
        base = self._aimd_base
        if base is None:
            return known
        elapsed = max(0.0, now - self._aimd_at)
        if known is None and self._ceiling is not None:
            # No limit known: back to near the rate the last 429 came at within RECOVER_SECONDS, then
            # probe beyond it gently (a 429 there sets a new, lower or higher, ceiling).
            target = max(base, PROBE_FRACTION * self._ceiling)
            if elapsed < RECOVER_SECONDS:
                return base + (target - base) * elapsed / RECOVER_SECONDS
            return target + PROBE_PER_SECOND * self._ceiling * (elapsed - RECOVER_SECONDS)
        if known is not None:  # back to the known limit within KNOWN_RECOVER_SECONDS, however deep the cut
            cap = base + max(0.0, known - base) * elapsed / KNOWN_RECOVER_SECONDS
        else:
            cap = base + INCREASE_PER_SECOND * base * elapsed
        if known is not None and cap >= known:
            self._aimd_base = None
            return known
        return cap if known is None else min(known, cap)

    def _capacity(self, now: float) -> float | None:
        """What one window admits at the pace of `limit(now)`; None = unpaced (also for a limit <= 0)."""
        limit = self.limit(now)
        return limit / WINDOW_FRACTION if limit is not None and limit > 0 else None

    def plan(self, cost: float, now: float) -> float:
        """When a request of `cost` may start (never earlier than the last one admitted)."""
        start = max(now, self._last)
        capacity = self._capacity(now)
        if capacity is None:
            return start
        # The pace's schedule, but never more than one request's spacing at the current pace after the last
        # start: a backlog scheduled while the pace was low does not outlive it.
        spacing = min(cost, capacity) * (WINDOW_SECONDS + GUARD_SECONDS) / capacity
        start = max(start, min(self._tat - BURST_SECONDS, self._last + spacing))
        self._advance(start)
        excess = self.recent_total + self._old_total + min(cost, capacity) - capacity
        if excess > 0:
            start = max(start, self._expiry_covering(excess))
        return start

    def commit(self, cost: float, start: float, now: float) -> list[float]:
        """Record a request of `cost` starting at `start` (>= `plan`'s answer); returns its log entry."""
        self._advance(start)
        capacity = self._capacity(now)
        if capacity is not None:
            cost = min(cost, capacity)
            tat = min(self._tat, start + BURST_SECONDS)  # see plan
            self._tat = max(tat, start) + cost * (WINDOW_SECONDS + GUARD_SECONDS) / capacity
        entry = [start, cost]
        self._recent.append(entry)
        self._minute.append(entry)
        self.recent_total += cost
        self.minute_total += cost
        self._last = start
        if self._first is None:
            self._first = start
        return entry

    def refund(self, entry: list[float]) -> None:
        """The server refused this request (429): it does not count in Azure's window, so not here."""
        at, cost = entry
        if at > self._advanced - WINDOW_SECONDS:
            self.recent_total -= cost
        elif at > self._advanced - WINDOW_SECONDS - GUARD_SECONDS:
            self._old_total -= cost
        if at > self._advanced - MINUTE_SECONDS:
            self.minute_total -= cost
        entry[1] = 0.0

    def _expiry_covering(self, excess: float) -> float:
        """When enough of the log has aged out of the guarded window to make room for `excess`."""
        for entries in (self._old, self._recent):
            for at, cost in entries:
                excess -= cost
                if excess <= 0:
                    return at + WINDOW_SECONDS + GUARD_SECONDS
        return self._last + WINDOW_SECONDS + GUARD_SECONDS  # unreachable while cost <= capacity

    def _advance(self, now: float) -> None:
        self._advanced = max(self._advanced, now)
        recent, old, minute = self._recent, self._old, self._minute
        while recent and recent[0][0] <= now - WINDOW_SECONDS:
            entry = recent.popleft()
            self.recent_total -= entry[1]
            old.append(entry)
            self._old_total += entry[1]
        while old and old[0][0] <= now - WINDOW_SECONDS - GUARD_SECONDS:
            self._old_total -= old.popleft()[1]
        while minute and minute[0][0] <= now - MINUTE_SECONDS:
            self.minute_total -= minute.popleft()[1]
        if not recent:
            self.recent_total = 0.0  # no float drift
            if not old:
                self._old_total = 0.0
        if not minute:
            self.minute_total = 0.0

    def learn(
        self,
        remaining: float | None,
        limit: float | None,
        usage: tuple[float, float],
        now: float,
        floor: float,
    ) -> None:
        """A response's headers: `limit` per minute if the server said it, else `remaining` in its window.

        `usage` is what this process had sent, when the request was admitted, over the last 10 s and the
        last minute. Which window `remaining` counts is told from the data (see `_tell_window`): over
        10 s, `(remaining + 10 s usage) × 6` is the per-minute capacity left to this process; over a
        minute, `remaining + minute usage` is. Until it is told, the lower of the two (the other would
        overrun a minute-long window sixfold). Neither is taken below `floor` per minute. A lower estimate
        applies at once; a higher one is approached over LEARN_SECONDS, so that clients sharing a quota do
        not all grab the same headroom at the same moment.
        """
        if limit is not None and limit > 0:
            self.learned = max(floor, limit)
            self._learned_from_limit_header = True
            return
        if remaining is None or self._learned_from_limit_header:
            return
        # What is left is shared with the others who use the quota (else every replica claims all of it
        # at once and together they overrun it).
        ten = (usage[0] + remaining * self._share(0, remaining + usage[0], now)) * WINDOW_FRACTION
        minute = usage[1] + remaining * self._share(1, remaining + usage[1], now)
        self._minute_reading = max(floor, minute)
        told_before = self.counts
        young = self._first is None or now - self._first < MINUTE_SECONDS
        self._tell_window(remaining + usage[0], usage[1] - usage[0], usage[0], floor, young)
        if self.counts == WINDOW_SECONDS:
            sample = ten
        elif self.counts == MINUTE_SECONDS:
            sample = minute
        else:
            sample = min(ten, minute)
        if self.counts != told_before:
            self._samples.clear()  # what was learned under the other reading does not count
        self._samples.append(max(floor, sample))
        ordered = sorted(self._samples)
        estimate = ordered[len(ordered) // 2]  # the median: robust to a sample off by a request in flight
        if self.learned is None or estimate <= self.learned or self.counts != told_before or self.peers == 0:
            self.learned = estimate
        else:
            self.learned += (estimate - self.learned) * min(1.0, (now - self._learned_at) / LEARN_SECONDS)
        self._learned_at = now

    def _share(self, reading: int, capacity: float, now: float) -> float:
        """How much of what remains this process claims: all of it alone (or told no other replica is
        at work), `SHARED_CLAIM` of it when others use the quota too (each claims the same part, whatever it uses: additive, hence fair).
        Others' usage is the most capacity ever seen (fading over `PEAK_SECONDS`: a quota can shrink)
        less the capacity left to this process now; below `SHARE_QUANTUM` of it, noise."""
        peak = max(capacity, self._faded_peak(reading, now))
        self._peaks[reading] = peak
        self._peaks_at[reading] = now
        if self.peers == 0:  # no other process of the job at work: what remains is ours
            return 1.0
        return SHARED_CLAIM if peak - capacity > SHARE_QUANTUM * peak else 1.0

    def _faded_peak(self, reading: int, now: float) -> float:
        peak = self._peaks[reading]
        if peak is None:
            return 0.0
        return peak * math.exp(-max(0.0, now - self._peaks_at[reading]) / PEAK_SECONDS)

    def counts_a_minute(self) -> None:
        """A 429 asked to wait longer than a 10 s window could make it: `remaining` counts a minute."""
        if self.counts == MINUTE_SECONDS:
            return
        self.counts = MINUTE_SECONDS
        self._samples.clear()
        if (
            self._minute_reading is not None
            and self.learned is not None
            and not self._learned_from_limit_header
        ):
            self.learned = min(self.learned, self._minute_reading)

    def _tell_window(self, ten: float, aged: float, sent: float, floor: float, young: bool) -> None:
        """Which window `remaining` counts, from how it moves as this process's usage ages past 10 s.

        `ten` = remaining + own usage over 10 s; `aged` = own usage between 10 s and a minute ago; `sent`
        = own usage over 10 s; `young`: this process sent its first request less than a minute ago. Over a
        10 s window `ten` stays put (less what others use) while `aged` grows; over a minute it falls by as
        much as `aged` grew (and by what others' minute usage grew). Three ways to tell 10 s:

        - **Own usage ages, `ten` holds.** Compared with the latest sample of least `aged` among the recent
          ones, once `aged` grew by a clear margin (`SHAPE_EVIDENCE` of the capacity, and more than a few
          requests): a fall of `ten` by less than a quarter of that growth says 10 s. A larger fall says a
          minute only if no one else started to use the quota meanwhile, which the data cannot tell: it
          says nothing, and the comparison moves on to later samples (peers ramping up after this process's
          first samples would otherwise hide the window from it for as long as those samples are kept).
        - **Others' usage comes back.** `ten` rising clearly above an earlier sample while `aged` did not
          fall, within this process's first minute: over a minute, others' usage would have to leave the
          window, which it cannot within a minute of their start; over 10 s their burst aged out. So
          replicas started together tell the window as their start-up bursts age, all at about the same
          time (one that cannot tell paces at the minute reading, a sixth of its share, and finishes
          last, alone and slowly). Later in a run others' old usage can leave a minute: not taken.
        - **`remaining` does not go down as this process sends** (`ten` rising with `sent` since the
          oldest sample kept, before any own usage aged past 10 s): it does not count this process at all
          (a quota far larger than its use, a constant from a gateway): the larger reading, 10 s, is as
          good as any, and is told within the first requests rather than after 10 s of pacing at the
          minute reading (which held a run against such a server to a sixth of its pace at the start).

        A minute is left to the lower reading (which is the minute reading over a minute) and to a 429
        asking to wait more than 10 s (`counts_a_minute`), which the data cannot overrule afterwards.
        Replicas sharing a 10 s window misread as a minute starve each other.
        """
        if self.counts == MINUTE_SECONDS:
            return  # a 429 asked to wait longer than 10 s: the data cannot say otherwise
        shapes = self._shapes
        shapes.append((ten, aged, sent))
        # The latest of the least aged: the nearest in time, so that others' usage changed the least since.
        reference_ten, reference_aged, _sent = min(reversed(shapes), key=lambda shape: shape[1])
        requests = floor / MIN_REQUESTS_PER_MINUTE  # the mean cost of a request in this dimension
        grown = aged - reference_aged
        if grown > 0 and grown >= max(3.0 * requests, SHAPE_EVIDENCE * max(reference_ten, ten)):
            if reference_ten - ten < grown / 4:
                self.counts = WINDOW_SECONDS
            else:  # no answer: compare with later samples from now on
                while len(shapes) > 1 and shapes[0][1] <= reference_aged:
                    shapes.popleft()
            return
        # Others' usage came back (see above).
        evidence = max(3.0 * requests, SHAPE_EVIDENCE * ten)
        if young and any(
            aged >= then_aged and ten - then_ten >= evidence for then_ten, then_aged, _ in shapes
        ):
            self.counts = WINDOW_SECONDS
            return
        # Before any own usage has aged past 10 s (nothing of it can have left either window yet): what
        # this process sent since the oldest sample kept, and whether `remaining` went down by it.
        oldest_ten, oldest_aged, oldest_sent = shapes[0]
        more = sent - oldest_sent
        if aged == oldest_aged == 0 and more >= 10.0 * requests and ten - oldest_ten >= more / 2:
            self.counts = WINDOW_SECONDS

    def decrease(self, now: float, floor: float) -> None:
        """A 429: pace at DECREASE_FACTOR × min(current limit, what was actually sent lately), >= `floor`.

        When nothing was sent lately, the cut is from the current limit; with no limit either, there is
        nothing to cut from and the pace stays as it is (the server's retry-after pauses the deployment).
        With no limit known, what the last 10 s held when the 429 came (× 6 a minute) is remembered as
        the ceiling that `limit` returns to quickly and then probes beyond gently.
        """
        self._advance(max(now, self._last))
        elapsed = max(1.0, min(WINDOW_SECONDS, now - (self._first if self._first is not None else now)))
        sent = self.recent_total / elapsed * 60.0
        current = self.limit(now)
        if self.known is None and self.recent_total > 0:
            self._ceiling = max(floor, self.recent_total * WINDOW_FRACTION)
            if current is not None:
                current = min(current, self._ceiling)
        if sent > 0:
            base = sent if current is None else min(current, sent)
        elif current is not None:
            base = current
        else:
            return
        factor = (
            CEILING_DECREASE_FACTOR if self.known is None and self._ceiling is not None else DECREASE_FACTOR
        )
        self._aimd_base = max(floor, factor * base)
        self._aimd_at = now

    def snapshot(self, now: float) -> dict[str, Any]:
        limit = self.limit(now)
        return {
            "configured": self.configured,
            "learned": None if self.learned is None else round(self.learned),
            "pacing": None if limit is None else round(limit),
            "backed_off": self._aimd_base is not None,
            "remaining_counts_s": self.counts,
        }


class Permit:
    """One attempt's place in the budget, as an async context manager (see `RateBudget.admit`).

    Entering waits for a window slot, the TPM/RPM pacing and any 429 pause. Leaving releases the slot and
    tells the budget how the attempt went, as the caller classified it: `observe(response.headers)` for
    an answer (its latency grows the window, its headers teach the deployment's limit), `throttled(headers)`
    for a 429 (cuts the window and the rate), `failed()` for anything else. Leaving without a verdict is
    an answer, or neutral when an exception leaves (a cancelled attempt).
    """

    __slots__ = (
        "_budget",
        "_held",
        "_throttled_headers",
        "_verdict",
        "admitted_at",
        "entries",
        "full_mark",
        "tokens",
        "usage",
        "usage_minute",
        "waited",
    )

    def __init__(self, budget: RateBudget, tokens: int) -> None:
        self._budget = budget
        self.tokens = tokens
        self.waited = 0.0
        self.admitted_at = 0.0
        self.usage = (0.0, 0.0)  # this process's (tokens, requests) in Azure's window when admitted
        self.usage_minute = (0.0, 0.0)  # ... and over the last minute
        self.entries: tuple[list[float], list[float]] | None = None  # its place in the usage logs
        self.full_mark = 0  # see RateBudget._full_marks
        self._held = False
        self._verdict: str | None = None
        self._throttled_headers: Mapping[str, str] = {}

    async def __aenter__(self) -> Permit:
        self.full_mark = await self._budget._take_slot()
        try:
            self.waited = await self._budget._wait_turn(self.tokens, self)
        except BaseException:
            self._budget._release_slot()
            raise
        self.admitted_at = self._budget.clock.now()
        self._held = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._held:
            return
        self._held = False
        self._budget._finish(self, exc)

    def observe(self, headers: Mapping[str, str]) -> None:
        """The deployment answered: learn from the response's x-ratelimit-* headers."""
        self._verdict = "answered"
        self._budget._observe(self, headers)

    def throttled(self, headers: Mapping[str, str]) -> None:
        """The deployment answered 429 with these headers."""
        self._verdict = "throttled"
        self._throttled_headers = headers

    def failed(self) -> None:
        """The attempt failed otherwise (5xx, timeout, ...): neither a sign of the limit nor of latency."""
        self._verdict = "failed"


class RateBudget:
    """Admission control for one deployment.

    `async with budget.admit(tokens) as permit:` around each attempt (window + pacing + pause), with
    `permit.observe(response.headers)`; `pause(seconds)` on a 429's retry-after.
    """

    def __init__(
        self,
        *,
        tpm: int | None,
        rpm: int | None,
        clock: Clock | None = None,
        max_window: int | None = None,
    ) -> None:
        self.clock: Clock = clock or MonotonicClock()
        self.tokens = Dimension(float(tpm) if tpm else None)
        self.requests = Dimension(float(rpm) if rpm else None)
        self._paused_until = -math.inf
        self._pauses = 0
        self.max_window = max(1, max_window or DEFAULT_MAX_WINDOW)
        self.window = float(min(INITIAL_WINDOW, self.max_window))
        self._slow_start = True
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[int]] = deque()
        self._last_cut = -math.inf
        self._full_marks = 0  # counts the moments the window filled up; a permit that saw one may grow it
        self.latency: float | None = None
        self._needed = math.inf  # see _update_needed
        self._mean_cost: float | None = None
        self.throttled = 0

    # ---- the public API ---------------------------------------------------------------------------

    def admit(self, tokens: int) -> Permit:
        """`async with budget.admit(tokens) as permit:` — one attempt of estimated cost `tokens`."""
        return Permit(self, tokens)

    def set_peers(self, others: int | None) -> None:
        """How many other worker processes are at work on the job now (worker/peers.py; None: not
        known). With none (the last replica at work, or a run on its own), what remains of a learned quota
        is claimed whole and a higher reading applies at once: the others' usage still in the window is
        leaving it, not renewed. Otherwise half of what remains is claimed while others' usage shows, and a
        higher reading is approached over LEARN_SECONDS, so that replicas do not all grab it at once
        (claiming a part per replica, 1/(n+1), starved one replica of three in simulations)."""
        self.tokens.peers = self.requests.peers = others

    def pause(self, seconds: float) -> None:
        """The service said to wait: hold every request to this deployment for `seconds`."""
        until = self.clock.now() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self._pauses += 1

    def window_limit(self) -> int:
        """Requests allowed in flight now, at most `max_window`: what the paced rate needs at the observed
        latency (Little's law) once both are known; before that, the slow-start window."""
        needed = self._needed if self._needed < math.inf else self.window
        return max(1, int(min(float(self.max_window), needed) + 1e-9))

    def _update_needed(self) -> None:
        """Little's law: the paced request rate × latency, with headroom (recomputed on each answer and
        429, so that the window follows a cut or a recovery of the rate at once)."""
        self._needed = math.inf
        if self.latency is not None:
            rate = self._requests_per_second(self.clock.now())
            if rate is not None:
                self._needed = max(MIN_WINDOW, LATENCY_HEADROOM * rate * self.latency + WINDOW_SLACK)

    def snapshot(self) -> dict[str, Any]:
        """What the budget knows now, for the manifest and the logs."""
        now = self.clock.now()
        return {
            "tpm": self.tokens.snapshot(now),
            "rpm": self.requests.snapshot(now),
            "window": self.window_limit(),
            "latency_s": None if self.latency is None else round(self.latency, 4),
            "throttled": self.throttled,
        }

    # ---- pacing -----------------------------------------------------------------------------------

    async def _wait_turn(self, tokens: int, permit: Permit) -> float:
        clock = self.clock
        waited = 0.0
        if self._mean_cost is None:
            self._mean_cost = float(tokens)
        else:
            self._mean_cost += 0.05 * (tokens - self._mean_cost)
        while True:
            now = clock.now()
            if self._paused_until > now:
                delay = self._paused_until - now
                await clock.sleep(delay)
                waited += delay
                continue
            pauses = self._pauses
            start = max(self.tokens.plan(tokens, now), self.requests.plan(1, now))
            entries = (self.tokens.commit(tokens, start, now), self.requests.commit(1, start, now))
            permit.entries = entries
            permit.usage = (self.tokens.recent_total, self.requests.recent_total)
            permit.usage_minute = (self.tokens.minute_total, self.requests.minute_total)
            if start > now:
                try:
                    await clock.sleep(start - now)
                except BaseException:  # cancelled (e.g. SIGTERM): the request will not be sent
                    self.tokens.refund(entries[0])
                    self.requests.refund(entries[1])
                    raise
                waited += start - now
            # A pause announced while this request slept still applies: wait it out, then queue again.
            if self._pauses == pauses or self._paused_until <= clock.now():
                return waited
            self.tokens.refund(entries[0])
            self.requests.refund(entries[1])

    def _requests_per_second(self, now: float) -> float | None:
        rates = []
        requests = self.requests.limit(now)
        if requests is not None:
            rates.append(requests / 60.0)
        tokens = self.tokens.limit(now)
        if tokens is not None and self._mean_cost:
            rates.append(tokens / 60.0 / self._mean_cost)
        return min(rates) if rates else None

    # ---- the window on requests in flight ---------------------------------------------------------

    async def _take_slot(self) -> int:
        """Take a slot in the window; returns the full-window mark to compare with on success."""
        if not self._waiters:
            limit = self.window_limit()
            if self.in_flight < limit:
                mark = self._full_marks
                self.in_flight += 1
                self._note_if_full()
                return mark
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # the slot was handed over just as the wait was cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _release_slot(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        limit = self.window_limit()
        mark = self._full_marks
        while self._waiters and self.in_flight < limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(mark)
        self._note_if_full()

    def _note_if_full(self) -> None:
        # Only the AIMD window counts: when the rate × latency cap binds, growing the window is pointless.
        if self.in_flight >= int(self.window + 1e-9):
            self._full_marks += 1

    # ---- feedback ---------------------------------------------------------------------------------

    def _observe(self, permit: Permit, headers: Mapping[str, str], *, refused: bool = False) -> None:
        """Learn from an answer's headers; a refusal's `remaining` (the window is full) is no sample."""
        now = self.clock.now()
        floors = self._floors()
        for dimension, name, usage, floor in (
            (self.tokens, "tokens", (permit.usage[0], permit.usage_minute[0]), floors[0]),
            (self.requests, "requests", (permit.usage[1], permit.usage_minute[1]), floors[1]),
        ):
            dimension.learn(
                None if refused else _header_number(headers, REMAINING_HEADERS[name]),
                _header_number(headers, LIMIT_HEADERS[name]),
                usage,
                now,
                floor,
            )

    def _floors(self) -> tuple[float, float]:
        """The lowest (tokens, requests) per minute a limit is learned or cut to."""
        mean_cost = max(1.0, self._mean_cost or 1.0)
        return MIN_REQUESTS_PER_MINUTE * mean_cost, MIN_REQUESTS_PER_MINUTE

    def _finish(self, permit: Permit, exc: BaseException | None) -> None:
        now = self.clock.now()
        verdict = permit._verdict or ("answered" if exc is None else None)
        if verdict == "answered":
            # The window held requests back if it filled up while this one was out, and pacing did not.
            self._succeeded(
                now - permit.admitted_at, permit.full_mark != self._full_marks and permit.waited == 0
            )
        elif verdict == "throttled":
            if permit.entries is not None:
                # Azure did not count the refused request: neither in what it says remains, nor here.
                tokens, requests = permit.entries
                permit.usage = (permit.usage[0] - tokens[1], permit.usage[1] - requests[1])
                permit.usage_minute = (
                    permit.usage_minute[0] - tokens[1],
                    permit.usage_minute[1] - requests[1],
                )
                self.tokens.refund(tokens)
                self.requests.refund(requests)
            self._observe(permit, permit._throttled_headers, refused=True)
            self._throttled(permit, now)
        self._update_needed()
        self._release_slot()

    def _succeeded(self, latency: float, window_was_full: bool) -> None:
        self.latency = (
            latency if self.latency is None else self.latency + LATENCY_WEIGHT * (latency - self.latency)
        )
        if window_was_full and self.window < self.max_window:
            # Grow only while the window is what holds requests back (else it would grow unboundedly):
            # by one per success in slow start, else by one per window's worth of successes.
            step = 1.0 if self._slow_start else 1.0 / max(1, int(self.window + 1e-9))
            self.window = min(float(self.max_window), self.window + step)

    def _throttled(self, permit: Permit, now: float) -> None:
        self.throttled += 1
        wait = _server_wait(permit._throttled_headers)
        if wait is not None and WINDOW_SECONDS + 1.0 < wait <= MINUTE_SECONDS + 1.0:
            # Only a window longer than 10 s makes a server ask to wait longer than 10 s (and less than
            # an hour: a daily quota): tokens are counted over a minute.
            self.tokens.counts_a_minute()
        if permit.admitted_at <= self._last_cut:
            return  # admitted before the last cut: that cut already answered this congestion
        self._last_cut = now
        self._slow_start = False
        self.window = max(float(MIN_WINDOW), min(self.window, WINDOW_DECREASE * self.in_flight))
        tokens_floor, requests_floor = self._floors()
        self.tokens.decrease(now, tokens_floor)
        self.requests.decrease(now, requests_floor)

    # ---- for a router choosing among deployments (non-committing) ----------------------------------

    def wait_estimate(self, tokens: int) -> float:
        """Seconds a request of `tokens` would wait for its turn if it asked now; 0 when it would go at
        once. Takes no place in the budget: the 429 pause, the pacing of both dimensions (`plan` only
        ages the usage logs to a moment a request would reach anyway) and, when the window on requests in
        flight is full, the time the requests queued for a slot take to drain at one window per latency.
        Before the first answer (no latency yet) a full start-up window is not counted: it says nothing
        of the deployment's budget, and a higher priority should not spill for it; a full --concurrency
        ceiling is (an unknown latency counting as a second)."""
        now = self.clock.now()
        wait = max(0.0, self._paused_until - now)
        start = max(self.tokens.plan(tokens, now), self.requests.plan(1, now))
        wait = max(wait, start - now)
        limit = self.window_limit()
        known = self.latency is not None or limit >= self.max_window
        if known and (self._waiters or self.in_flight >= limit):
            latency = self.latency if self.latency is not None else 1.0
            wait += latency * (1 + len(self._waiters)) / limit
        return wait

    def headroom(self) -> float:
        """Tokens (else requests) left in the current window at today's pace; inf when unpaced."""
        now = self.clock.now()
        for dimension in (self.tokens, self.requests):
            capacity = dimension._capacity(now)
            if capacity is not None:
                return capacity - dimension.recent_total - dimension._old_total
        return math.inf


class Budgets:
    """One RateBudget per deployment: a pool deployment's with its own quota (`configure`), any other
    created on first use with the job's --tpm/--rpm."""

    def __init__(
        self,
        *,
        tpm: int | None,
        rpm: int | None,
        clock: Clock | None = None,
        concurrency: int | None = None,
    ) -> None:
        self._tpm, self._rpm, self._clock, self._concurrency = tpm, rpm, clock, concurrency
        self._by_deployment: dict[str, RateBudget] = {}
        self._peers: int | None = None

    def __getitem__(self, deployment: str) -> RateBudget:
        budget = self._by_deployment.get(deployment)
        if budget is None:
            budget = self._by_deployment[deployment] = RateBudget(
                tpm=self._tpm, rpm=self._rpm, clock=self._clock, max_window=self._concurrency
            )
            budget.set_peers(self._peers)
        return budget

    def configure(self, deployment: str, *, tpm: int | None, rpm: int | None) -> RateBudget:
        """The budget of a deployment with its own quota (None: learned from the headers)."""
        budget = self._by_deployment[deployment] = RateBudget(
            tpm=tpm, rpm=rpm, clock=self._clock, max_window=self._concurrency
        )
        budget.set_peers(self._peers)
        return budget

    def set_peers(self, others: int | None) -> None:
        """How many other worker processes are at work on the job now (None: not known)."""
        self._peers = others
        for budget in self._by_deployment.values():
            budget.set_peers(others)

    def window(self) -> int:
        """Requests the budgets let in flight now, over every deployment (before any call: the first
        window of one)."""
        if not self._by_deployment:
            return min(INITIAL_WINDOW, max(1, self._concurrency or DEFAULT_MAX_WINDOW))
        return sum(budget.window_limit() for budget in self._by_deployment.values())

    def full(self) -> bool:
        """The budgets' windows hold as many requests as they let in flight (pacing or waiting for their
        turn counts): the work already taken keeps them busy, and more would only queue."""
        budgets = self._by_deployment.values()
        if not budgets:
            return False
        taken = sum(budget.in_flight + len(budget._waiters) for budget in budgets)
        return taken >= sum(budget.window_limit() for budget in budgets)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per deployment: configured/learned/paced limits, window, latency, 429s."""
        return {name: budget.snapshot() for name, budget in self._by_deployment.items()}
