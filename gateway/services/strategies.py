"""Routing strategies: each picks one replica for a request.

A strategy sees only the replicas that may take the request (healthy, not yet tried
for it; never an empty list) and returns the one chosen with a short word saying how
(`rotation`, `least`, `cache`, `hash`, `balance`, `overflow`, `session`, `score`),
which the routing-decision metric counts.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from citadel.gateway.routes import RoutingStrategy
from citadel.gateway.services.prefix import (
    MAX_BLOCKS,
    BlockTable,
    Mark,
    block_hashes,
    continues,
    prefix_window,
    prompt_mark,
    rendezvous,
)
from citadel.gateway.services.replicas import Replica

Placed = Callable[[str, list[int], Mark | None], None]
"""Told a prefix-aware choice: the replica's URL, blocks of the prompt now held
there, and the prompt's mark when they close a whole window (`PrefixAware`)."""


@dataclass(frozen=True)
class RouteRequest:
    """What strategies may look at: the parsed body and the session header."""

    body: Mapping[str, Any]
    session: str | None = None
    adapter: str | None = None
    """The LoRA adapter the request names, sent to the replica as its model;
    None for the base model (by any of its names)."""


class Strategy(Protocol):
    """Picks a replica; `replicas` is never empty."""

    def choose(
        self, replicas: Sequence[Replica], request: RouteRequest
    ) -> tuple[Replica, str]: ...


class _Turns:
    """A counter that moves on at each choice (where ties start, or whose turn)."""

    def __init__(self) -> None:
        self._turns = 0

    def _turn(self) -> int:
        self._turns += 1
        return self._turns


class RoundRobin(_Turns):
    """Each replica in turn."""

    def choose(
        self, replicas: Sequence[Replica], request: RouteRequest
    ) -> tuple[Replica, str]:
        return replicas[self._turn() % len(replicas)], "rotation"


class LeastLoad(_Turns):
    """The replica with the fewest requests outstanding from this gateway; ties go
    round the replicas in turn so an idle pool is still shared."""

    def choose(
        self, replicas: Sequence[Replica], request: RouteRequest
    ) -> tuple[Replica, str]:
        return least_loaded(replicas, self._turn()), "least"


def least_loaded(replicas: Sequence[Replica], start: int = 0) -> Replica:
    """The replica with the fewest requests in flight, first from `start` on ties."""
    n = len(replicas)
    best = replicas[start % n]
    for i in range(1, n):
        candidate = replicas[(start + i) % n]
        if candidate.in_flight < best.in_flight:
            best = candidate
    return best


_NO_MARK: Mark = (0, 0, 0)
"""The mark of a prompt `prompt_mark` cannot mark: nothing continues it."""


class _Window:
    """Where a whole hashed window's last request went, where that request's
    prompt ended (`PrefixAware._last_holder`), and the pairs of messages
    before a last message that more than one conversation sent."""

    __slots__ = ("mark", "shared_pairs", "url")

    SHARED_PAIRS = 4
    """Shared pairs kept per window (a few-shot prompt has one)."""

    def __init__(self, url: str, mark: Mark) -> None:
        self.url = url
        self.mark = mark
        self.shared_pairs: tuple[int, ...] = ()

    def sent(self, url: str, mark: Mark) -> None:
        """Notes a request of the window sent to `url`, its prompt ending at
        `mark`. Two requests as long, with the same pair before different
        last messages, are two conversations sharing that pair (a few-shot
        example past the window, behind tools that fill it): the pair tells
        nothing of a conversation from then on (or a client edited its last
        message, which then continues by that message alone)."""
        count, last, before = mark
        old_count, old_last, old_before = self.mark
        shared = before and (count, before) == (old_count, old_before)
        if shared and last != old_last and before not in self.shared_pairs:
            self.shared_pairs = (*self.shared_pairs, before)[-self.SHARED_PAIRS :]
        self.url, self.mark = url, mark

    def continued_by(self, body: Mapping[str, Any]) -> bool:
        """Whether `body` continues the window's last request, its pair
        counting only if not shared."""
        count, last, before = self.mark
        if before in self.shared_pairs:
            return continues(body, (count, last, 0))
        return continues(body, self.mark)


class PrefixAware(_Turns):
    """Requests sharing a prompt prefix go where that prefix was sent, with
    bounded load.

    The prefix is the prompt as the backend's prefix cache tells prompts apart
    (`prefix_text`): a chat's tool schemas first, its media parts as hashes of
    their payloads.

    The longest known chain of block hashes wins (`cache`); when several replicas were
    sent that prefix (a system prompt many conversations start with), the least loaded
    of them takes the request, as in SGLang's cache-aware router, which picks the worker
    with the longest match and breaks ties by load; a prompt known to its last hashed
    block (a conversation past the window) goes back where it went last, unless that
    holder leads the least loaded by `HOLDER_LEAD` (`_last_holder`). A prefix never seen
    goes to the replica its first block hashes to (`hash`), so requests sharing a system
    prompt meet on one replica. When the known part is less than `cache_threshold` of
    the prompt (a new conversation that shares only a system prompt, followed by a long
    text of its own), the least-loaded replica takes it instead (`balance`): most of its
    prefill is due wherever it goes, and a burst of such conversations would otherwise
    pile onto the system prompt's replica (SGLang's router makes the same cut, at the
    same default). A choice is overruled (`overflow`) and the least-loaded replica takes
    the request when one of the two is out of line with the average load: the chosen one
    carries more than `load_factor` x the average + 1 requests and leads the
    least-loaded one by at least one request per `blocks_per_request` blocks of the
    prompt it holds (a hot spot), or the least-loaded one carries fewer than the average
    / `load_factor` - 1, fewer than the chosen one, and was chosen for under half as
    many of the last choices as the offered replicas' mean (a cold spot: a new pod, or
    one left out, among busy replicas whose prefixes every request matches; see
    `_remember` for the window). Moving a request off a busy replica costs the prefill
    of the prefix it leaves behind, so the longer that prefix, the more load it is worth
    to the hot bound. A whole known prompt (64 blocks) may lead by 7 before it moves; a
    new conversation that shares a system prompt of a few blocks moves as soon as a
    relative bound is passed, which keeps the conversations on a system prompt from
    piling onto its replica. With a relative bound alone, multi-round QA lost
    conversations at its end, when a replica held three requests against one elsewhere,
    and each prefilled its 5,000 tokens again (issue 8's note of the ninth session has
    the runs). vllm-router's and SGLang's cache-aware policies also require an absolute
    lead (64 requests, and 1.5x) before they balance. The cold bound asks no such lead:
    the prefill there is paid once and the replica then holds the prefix, and with it a
    window every request shares (64 blocks of system prompt) had to lead by 8, which a
    closed loop of 16 users on 2 of 4 replicas never reached: the other 2, and every pod
    scaled up to, served nothing (a soak with real processes). The relative bounds keep
    a request where it is for an imbalance small next to the load (40 against 40, 40 and
    33 stays, whatever the lead), and even loads move nothing. The hot bound alone
    missed the cold spot: a new replica at 0 among n at L leaves the average at n / (n +
    1) x L, which L never passes by 25% from n = 4 on. When every request matches
    prefixes the old replicas hold (a shared system prompt, tool schemas), a new pod
    then never got one, so it never came to hold them, and a scale-up or a rolling
    update added no capacity. Once it took some it holds them too and, the least loaded
    of their holders, takes the next ones. A replica chosen its share of late is not
    cold, however few it carries: at small loads the cold bound is a request or two
    below the average, and a momentary dip (2, 2, 2 and 0; 12, 12, 12 and 7) moved a
    steady chat load's conversations off their replicas five times as often, each to
    prefill its history again, for no gain in balance.

    Args:
        load_factor: how far above the average load the chosen replica, or
            below it a cold least-loaded one, may be before overflow.
        capacity: slots of the table of block hashes, a power of two; each
            holds one hash (see `BlockTable`: 8 MiB when all are allocated).
        cache_threshold: the share of the prompt's blocks a known prefix must
            cover to decide the replica.
        blocks_per_request: blocks of held prefix that each request of lead
            over the least-loaded replica must be worth before a request leaves
            a hot spot.
        on_placed: called after each choice with the replica's URL, the
            blocks of the prompt it was not known to hold, and the deepest
            block (always, last), and, when that one closes a whole hashed
            window, where the prompt ends (`prompt_mark`): what other gateway
            replicas need to `learn` the choice (`placements`).
    """

    # Replica URLs get one bit each in the masks below. Pods come and go, each
    # new one a new URL: once the table's masks are full (64 bits) or this many
    # bits are handed out, those of the URLs no longer among the replicas are
    # taken back; more than 64 replicas at once widen the masks, and only this
    # many at once make the table start afresh.
    _MAX_REPLICAS = 1024
    RECENT = 256
    """Choices remembered, at least, to tell a replica left out (a new pod)
    from one that dipped a moment: its share of these. `RECENT_SHARE` each
    for a pool so large that this leaves fewer."""
    RECENT_SHARE = 64
    """Choices remembered per replica offered: with a share of 4 (256 over 64
    replicas) a replica serving its share had under half of it one time in
    ten by chance, and conversations moved to it at dips 3.5x as often."""
    WINDOWS = 1 << 13
    """Whole hashed windows held by more than one replica whose last replica is
    remembered (`_note_window`), the least recently sent forgotten first: a
    moved long conversation each, or a window many requests share, per gateway
    replica (1.4 MiB when full, 2 MiB after much turnover); one forgotten goes to
    the least loaded of its holders."""
    HOLDER_LEAD = 3
    """Requests in flight by which a window's last replica must lead another
    holder of it before the conversation's next turn goes to that one. With
    two gateway replicas sharing placements, each seeing its own requests in
    flight, a lead of 2 moved 35.7 of every 1,000 turns in a closed loop (32
    users, 4 to 8 replicas, 3 seeds), 3 moved 9.2 and 4 moved 5.8, with one
    gateway 2.4, 2.1 and 2.1; the mean latencies were within 1%."""

    def __init__(
        self,
        load_factor: float = 1.25,
        capacity: int = 1 << 19,
        cache_threshold: float = 0.5,
        blocks_per_request: int = 8,
        on_placed: Placed | None = None,
    ) -> None:
        super().__init__()
        self._on_placed = on_placed
        self._load_factor = load_factor
        self._cache_threshold = cache_threshold
        self._blocks_per_request = blocks_per_request
        # Block hash -> bit mask of the replicas it was sent to.
        self._owners = BlockTable(capacity)
        self._bits: dict[str, int] = {}
        # Bits taken back from URLs gone, cleared from every mask, to hand out
        # again. While none is free every bit below 1 << len(self._bits) is
        # held, so that one is the next.
        self._free: list[int] = []
        # The replicas of the last RECENT choices, and how many each had: a
        # replica with under half its share is cold (`_overflow`).
        self._recent: deque[str] = deque(maxlen=self.RECENT)
        self._recent_counts: dict[str, int] = {}
        # Hash of a whole hashed window -> where its last request went, least
        # recently sent first (`_last_holder`).
        self._windows: OrderedDict[int, _Window] = OrderedDict()

    def choose(
        self,
        replicas: Sequence[Replica],
        request: RouteRequest,
        *,
        pool: Sequence[Replica] | None = None,
    ) -> tuple[Replica, str]:
        """A replica of `replicas`, and how it was chosen.

        Args:
            pool: the replicas the model has, of which `replicas` are those
                with room (`Router.choose_with_room`); what is known of the
                others is kept (a new replica's bit reclaims only gone ones).
        """
        text, in_window = prefix_window(request.body)
        hashes = block_hashes(text, adapter=request.adapter)
        # One turn per request, wherever ties are broken: taking one at each
        # step would move the starting point by two and skip replicas.
        turn = self._turn()
        chosen, how, matched = self._by_prefix(hashes, replicas, turn, request.body)
        if how == "cache" and matched < self._cache_threshold * len(hashes):
            chosen, how = least_loaded(replicas, turn), "balance"
        if chosen is None:
            chosen, how = least_loaded(replicas, turn), "least"
        elif instead := self._overflow(chosen, replicas, matched, turn):
            chosen, how = instead, "overflow"
        fresh = self._owners.add(hashes, self._bit(chosen.url, pool or replicas))
        self._remember(chosen.url, len(replicas))
        window: Mark | None = None
        if len(hashes) == MAX_BLOCKS:
            window = prompt_mark(request.body, in_window=in_window) or _NO_MARK
            self._note_window(hashes[-1], chosen.url, window)
        if self._on_placed is not None and hashes:
            # The deepest block always: a peer that missed it (a message lost,
            # a gateway started since) then knows the conversation by its next
            # turn, and each request of a whole window is noted there too.
            if not fresh or fresh[-1] != hashes[-1]:
                fresh.append(hashes[-1])
            self._on_placed(chosen.url, fresh, window)
        return chosen, how

    def learn(
        self,
        url: str,
        blocks: Sequence[int],
        window: Mark | None,
        replicas: Sequence[Replica],
    ) -> bool:
        """Records that another gateway replica sent `blocks` to the replica at
        `url`, as if this one had (its `on_placed`); `window`, when the last
        block closes a whole hashed window, is where that request's prompt
        ended (`prompt_mark`).

        Only the placement is taken: the recent choices (the cold bound's
        shares) and the loads stay this gateway's own. Returns False, and
        records nothing, when `url` is not among `replicas` (the model's
        replicas as this gateway knows them: a pod gone, or not yet seen).
        """
        if not blocks or all(r.url != url for r in replicas):
            return False
        self._owners.add(blocks, self._bit(url, replicas))
        if window is not None:
            self._note_window(blocks[-1], url, window)
        return True

    def _note_window(self, window: int, url: str, mark: Mark) -> None:
        """Remembers `url` as where the whole window `window` went last, and
        `mark` as where that request's prompt ended, once more than one
        replica holds it: one holder leaves nothing to choose, and a one-off
        long prompt (a document, a batch) takes no room."""
        windows = self._windows
        entry = windows.get(window)
        if entry is not None:
            entry.sent(url, mark)
            windows.move_to_end(window)
            return
        mask = self._owners.owners(window)
        if mask & (mask - 1):
            windows[window] = _Window(url, mark)
            if len(windows) > self.WINDOWS:
                windows.popitem(last=False)

    def _last_holder(
        self,
        window: int,
        holding: Sequence[Replica],
        turn: int,
        body: Mapping[str, Any],
    ) -> Replica:
        """Of the replicas that hold the whole window `window`, the one its last
        request went to when this request continues that one's prompt (the
        same conversation) and that replica leads the least loaded of them by
        less than `HOLDER_LEAD`; else that least-loaded one.

        A prompt known to its last hashed block tells the gateway nothing of
        what follows: a conversation longer than the window. Two replicas come
        to hold such a window when the conversation is moved (a cold or hot
        bound, a retry); the least loaded of them, taken afresh at each turn,
        sent it back and forth as their loads crossed, each time to prefill
        again what the other had served since: in a closed-loop simulation
        (conversations of 20 KB of their own, 16 or 32 users, a scale-up from 4
        replicas to 5 or 8) 10 to 26 moves per moved conversation, 1.3 to 1.4
        with the last one kept, which holds that tail.

        Where every request shares the whole window (a long system prompt or
        tool set), the last request is anyone's, and keeping its replica sent
        turns to a replica other than their own more often than the
        least-loaded holder does (a user's own request, just done, leaves its
        replica the least loaded): 323 against 612 moves per 1,000 turns in a
        review's closed loop. The window cannot tell conversations apart; the
        end of the last request's prompt can (`continues`): the next turn of a
        conversation sends it again, another conversation's request does not.
        A count of how often the last replica changed told them apart before;
        with gateway replicas sharing placements, each balancing by its own
        requests in flight, their choices disagreed, every change counted, and
        conversations were taken for shared ones and sent back and forth: 110
        moves per 1,000 turns in a closed loop of two gateways (32 users, 4 to
        8 replicas), against 2.4 with one.
        """
        least = least_loaded(holding, turn)
        entry = self._windows.get(window)
        if entry is None or entry.url == least.url or not entry.continued_by(body):
            return least
        for replica in holding:
            if replica.url == entry.url:
                if replica.in_flight - least.in_flight < self.HOLDER_LEAD:
                    return replica
                break
        return least

    def _remember(self, url: str, offered: int) -> None:
        """Counts `url` among the last choices: RECENT, or RECENT_SHARE for
        each of the `offered` replicas if more (the window only grows: a
        share is read as the offered replicas' mean, whatever the length)."""
        wanted = self.RECENT_SHARE * offered
        if wanted > (self._recent.maxlen or 0):
            self._recent = deque(self._recent, maxlen=wanted)
        counts, recent = self._recent_counts, self._recent
        if len(recent) == recent.maxlen:
            gone = recent[0]
            left = counts[gone] - 1
            if left:
                counts[gone] = left
            else:
                del counts[gone]
        recent.append(url)
        counts[url] = counts.get(url, 0) + 1

    def _overflow(
        self,
        chosen: Replica,
        replicas: Sequence[Replica],
        matched: int,
        turn: int,
    ) -> Replica | None:
        """The least-loaded replica when `chosen`, holding `matched` blocks of the
        prompt, carries too much more than it to take the request; else None."""
        least = least_loaded(replicas, turn)
        gap = chosen.in_flight - least.in_flight
        if gap < 1:
            return None
        average = sum(r.in_flight for r in replicas) / len(replicas)
        lead = max(1, matched // self._blocks_per_request)
        if gap >= lead and chosen.in_flight > self._load_factor * average + 1:
            return least
        # The cold bound asks no lead (the class docstring says why).
        # A new pod is told from a dip by how often it was chosen of late.
        # Tests by what the least-loaded replica holds each missed a case
        # (c880c95 to 7666300: lacks the first block, never sent anything, a
        # prompt known whole, a prefix two replicas hold: a new pod idle for
        # good, or a conversation retried once following every dip). Half the mean: with
        # a quarter a new pod among tenants' replicas stopped at 50 requests
        # where they ran 120; at two thirds conversations over replicas of
        # uneven speeds moved more (4.7 -> 6.7 per 1,000 turns). The mean of
        # the offered replicas, not the window over the pool: the window is
        # sized for the largest pool seen, and after a scale-in from 16 to 4
        # every replica left was "under half" (13 of 20 dips moved).
        if least.in_flight >= average / self._load_factor - 1:
            return None
        counts = self._recent_counts
        share = sum(counts.get(r.url, 0) for r in replicas) / len(replicas)
        return least if counts.get(least.url, 0) < share / 2 else None

    def _bit(self, url: str, replicas: Sequence[Replica]) -> int:
        """The bit of `url` (one of `replicas`) in the masks."""
        bit = self._bits.get(url)
        if bit is None:
            full = min(self._owners.width, self._MAX_REPLICAS)
            if not self._free and len(self._bits) >= full:
                self._reclaim(replicas)
            bit = self._free.pop() if self._free else 1 << len(self._bits)
            self._bits[url] = bit
        return bit

    def _reclaim(self, replicas: Sequence[Replica]) -> None:
        """Takes back the bits of the URLs not among `replicas` and clears them
        from every mask, so that the replicas still there keep what was sent
        to them; when every URL is among them, widens the masks, or past
        `_MAX_REPLICAS` starts afresh.

        One pass over the table, on the request that brings a new URL when no
        bit is free: once per 64 new URLs, less the replicas there. A replica
        ejected, or tried already for this request, is not among `replicas`
        and loses its placements too: one replica's, where a wipe lost every
        replica's.
        """
        live = {r.url for r in replicas}
        gone = [url for url in self._bits if url not in live]
        if gone:
            self._free = [self._bits.pop(url) for url in gone]
            self._owners.keep(sum(self._bits.values()))  # the bits held, one each
        elif len(self._bits) < self._MAX_REPLICAS:
            self._owners.widen()
        else:
            self._bits.clear()
            self._owners.clear()

    def _by_prefix(
        self,
        hashes: list[int],
        replicas: Sequence[Replica],
        turn: int,
        body: Mapping[str, Any],
    ) -> tuple[Replica | None, str, int]:
        """The replica for the longest known prefix, how, and its length in
        blocks."""
        if not hashes:
            return None, "least", 0
        bits = [self._bits.get(r.url, 0) for r in replicas]
        owners = self._owners.owners
        for i in range(len(hashes) - 1, -1, -1):
            mask = owners(hashes[i])
            if not mask:
                continue
            holding = [r for r, bit in zip(replicas, bits, strict=True) if mask & bit]
            if len(holding) > 1 and i == MAX_BLOCKS - 1:
                holder = self._last_holder(hashes[i], holding, turn, body)
                return holder, "cache", i + 1
            if holding:
                return least_loaded(holding, turn), "cache", i + 1
        urls = [r.url for r in replicas]
        home = rendezvous(hashes[0], urls)
        return replicas[urls.index(home)], "hash", 0


class KvAware(_Turns):
    """The replica with the lowest load score from its vLLM metrics.

    score = in_flight + running / 2 + 2 x waiting + 4 x kv_cache_usage: queued
    requests weigh most, a nearly full KV cache means evictions and re-computation,
    and this gateway's own requests in flight count at once, between scrapes.

    A figure counts only when every replica offered reports it; otherwise it is
    left out of every replica's score. A replica that does not export one (or
    exports only NaN or infinities, which the scraper drops) scored 0 on it and
    looked idler than the replicas that report theirs; compared on the figures
    all of them report, it is ranked as busy as it says, no less.

    A replica with no report, or only one older than `max_age_s` (its /metrics
    fails, or it is new), reports no figure: then none counts, and the
    replicas are compared on their requests in flight alone (`least`), as they
    are when no figure is reported by all. Figures for some and none for others
    would make the one that cannot be read, as likely as not the busiest, look
    idle.

    Args:
        clock: monotonic seconds, the clock of `LoadReport.scraped_at`.
        max_age_s: how old a report may be and still count.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        max_age_s: float = math.inf,
    ) -> None:
        super().__init__()
        self._clock = clock
        self._max_age_s = max_age_s

    def choose(
        self, replicas: Sequence[Replica], request: RouteRequest
    ) -> tuple[Replica, str]:
        start, n = self._turn(), len(replicas)
        ordered = [replicas[(start + i) % n] for i in range(n)]
        scores = kv_scores(ordered, self._clock(), self._max_age_s)
        if scores is None:
            return least_loaded(ordered), "least"
        return ordered[scores.index(min(scores))], "score"


KV_WEIGHTS = (0.5, 2.0, 4.0)
"""The weights of the requests running, the requests waiting and the KV-cache
use (`LoadReport.figures`) in the KvAware score."""


def kv_scores(
    replicas: Sequence[Replica], now: float, max_age_s: float
) -> list[float] | None:
    """The KvAware score of each replica (lower is better), from the figures
    that every one of them reports in a report younger than `max_age_s`; None
    when no figure is reported by all."""
    scores = [float(r.in_flight) for r in replicas]
    counted = False
    lacking = (None, None, None)
    reports = [
        lacking if r.load.stale(now, max_age_s) else r.load.figures() for r in replicas
    ]
    for k, weight in enumerate(KV_WEIGHTS):
        values = [v for figures in reports if (v := figures[k]) is not None]
        if len(values) < len(replicas):
            continue  # one replica lacks it: it counts for none
        counted = True
        for i, value in enumerate(values):
            scores[i] += weight * value
    return scores if counted else None


class SessionAffinity:
    """Requests with the same session header go to the same replica (rendezvous
    hashing, so only that replica's sessions move when it goes); requests without
    one go to the least-loaded replica."""

    def __init__(self) -> None:
        self._least = LeastLoad()

    def choose(
        self, replicas: Sequence[Replica], request: RouteRequest
    ) -> tuple[Replica, str]:
        if not request.session:
            return self._least.choose(replicas, request)
        by_url = {r.url: r for r in replicas}
        return by_url[rendezvous(request.session, list(by_url))], "session"


def make_strategy(
    kind: RoutingStrategy,
    clock: Callable[[], float] = time.monotonic,
    load_max_age_s: float = math.inf,
    on_placed: Placed | None = None,
) -> Strategy:
    """A fresh strategy of the given kind.

    Args:
        kind: the strategy.
        clock: monotonic seconds (for `kv-aware`).
        load_max_age_s: how old a load report may be and count (`kv-aware`).
        on_placed: told each `prefix-aware` choice (`PrefixAware`).
    """
    if kind is RoutingStrategy.KV_AWARE:
        return KvAware(clock, load_max_age_s)
    if kind is RoutingStrategy.PREFIX_AWARE:
        return PrefixAware(on_placed=on_placed)
    factories: dict[RoutingStrategy, type[Strategy]] = {
        RoutingStrategy.ROUND_ROBIN: RoundRobin,
        RoutingStrategy.LEAST_LOAD: LeastLoad,
        RoutingStrategy.PREFIX_AWARE: PrefixAware,
        RoutingStrategy.SESSION_AFFINITY: SessionAffinity,
    }
    return factories[kind]()
