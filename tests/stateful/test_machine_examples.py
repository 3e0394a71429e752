"""Examples the machines once got wrong, or that caught a broken library: each is replayed
step by step, with every invariant checked after each rule."""

from __future__ import annotations

from ._machinery import replay
from .test_batch_machine import BatchMachine, BatchPolicyMachine, BatchRefreshingPolicyMachine
from .test_decorator_machine import AsyncCacheMachine, SingleFlightMachine
from .test_policy_machine import RefreshingAsyncPolicyMachine, RefreshingPolicyMachine
from .test_queue_machine import WorkerQueueMachine
from .test_refresh_machine import RefreshMachine
from .test_store_machine import SingleFlightStoreMachine


def test_two_computations_returning_none_are_told_apart() -> None:
    # The older computation is forgotten and returns None; the newer one returns None too and
    # stores it, rightly. A model telling results apart by value blamed the older one.
    replay(
        SingleFlightMachine,
        "decorate(maxsize=1, yielding=False); calls(batch=['a']);"
        "invalidate(key='a', use_async=True); release(pick=0, fail=False, none=True);"
        "calls(batch=['a']); release(pick=0, fail=False, none=True)",
    )


def test_cancelling_the_caller_whose_lookup_others_share() -> None:
    # The caller that started the lookup is cancelled while it is held: the caller sharing it
    # starts over. (A library that tells those sharing only when the lookup raises an
    # Exception, not on cancellation, leaves that caller waiting forever.)
    for machine in (WorkerQueueMachine, AsyncCacheMachine, SingleFlightMachine):
        init = "make_queue" if machine is WorkerQueueMachine else "decorate"
        replay(
            machine,
            f"{init}(maxsize=1, yielding=True);"
            "while_looking_up(action='cancel', after=[], batch=['a', 'a'], pick=0)",
        )


def test_an_item_waiting_in_line_runs_in_its_first_callers_context() -> None:
    # 'b' waits in line; its second caller shares the first one's lookup and joins. (A library
    # handing the item the context of a caller that joined it through a shared lookup ran it
    # as caller #2.)
    replay(
        WorkerQueueMachine,
        "make_queue(maxsize=1, yielding=True); calls(batch=['a', 'b', 'b']);"
        "release(fail=False, none=False, pick=0)",
    )


def test_a_key_left_out_of_its_batch_is_neither_sent_nor_stored() -> None:
    # 'b' waits in line behind 'a' and its one caller leaves: the batch leaves it out. (A library
    # that sent it anyway called the batch function for nobody; one that did not forget its
    # item stored what the left-out item returned.)
    replay(
        BatchMachine,
        "decorate(maxsize=1, max_batch=1); calls(batch=['a', 'b']);"
        "cancel(picks=[1], whole_key=False);"
        "answer(pick=0, plan=['value', 'value', 'value', 'value'], short=False)",
    )


def test_a_forgotten_keys_error_is_not_remembered_by_its_batch() -> None:
    # The batch of 'a' runs on after its one caller left; a clear forgets it, and a new call of
    # 'a' waits in line. The old batch answers 'a' with an exception cache_errors names: a
    # library that remembered it for 'a' raised it to later calls, which must load afresh.
    replay(
        BatchPolicyMachine,
        "decorate(maxsize=1, max_batch=1, mapping='dict'); calls(batch=['a'], later=0.0);"
        "cancel(picks=[0], whole_key=False); clear(use_async=False);"
        "calls(batch=['a'], later=0.0);"
        "answer(pick=0, plan=['remembered', 'value:short', 'value:short', 'value:short'],"
        " whole='each')",
    )


def test_cache_if_decides_for_each_key_of_a_batch() -> None:
    # cache_if refuses 'b''s value only: 'a''s is stored. (A library that asked cache_if about
    # the batch as a whole stored neither.)
    replay(
        BatchPolicyMachine,
        "decorate(maxsize=1, max_batch=2, mapping='dict'); calls(batch=['a', 'b'], later=0.0);"
        "answer(pick=0, plan=['value:short', 'value:skip', 'value:short', 'value:short'],"
        " whole='each')",
    )


def test_a_stale_value_served_for_a_key_waits_the_back_off() -> None:
    # 'a' expired 0 s ago and its load fails: its caller gets the primed value, which is then
    # served for refresh_backoff before the next attempt. (A library that served it without
    # the back-off loaded 'a' again at the next call.)
    replay(
        BatchPolicyMachine,
        "decorate(maxsize=1, max_batch=1, mapping='dict'); prime(key='a', kind='short',"
        " use_async=False); calls(batch=['a'], later=3.0);"
        "answer(pick=0, plan=['fail', 'value:short', 'value:short', 'value:short'],"
        " whole='each'); calls(batch=['a'], later=0.0)",
    )


def test_an_explicit_refresh_joining_a_background_refresh_is_never_deferred() -> None:
    # 'a' holds the one slot; 'b', primed, is found due and refreshed in the background; then
    # f.refresh('b') joins that refresh. The refresh now has a caller: it must compute in a
    # caller's slot when its turn comes, never be deferred as a refresh nobody waits for.
    replay(
        SingleFlightStoreMachine,
        "decorate(maxsize=1); calls(batch=['a']); prime(key='b', sync=False);"
        "advance(seconds=2.0); advance(seconds=2.0); advance(seconds=2.0);"
        "calls(batch=['b']); refresh(key='b')",
    )


def test_a_refresh_whose_result_cache_if_refuses_leaves_the_entry() -> None:
    # 'b' is due; its refresh returns a result cache_if refuses. (A library that stored a
    # refresh's result as it stores a prime's, whatever cache_if says, replaced the entry.)
    replay(
        RefreshMachine,
        "decorate(maxsize=1, policy='cache_if', lru=False); call(batch=['b']);"
        "release(fail=False, keep=True, pick=0, short=False); advance(seconds=5.0);"
        "call(batch=['b']); release(fail=False, keep=False, pick=0, short=False)",
    )


def test_a_short_lived_entry_is_refreshed_ahead_at_its_part_of_its_lifetime() -> None:
    # 'a' lives 4 s in an LRUCache (no ttl of its own): due at 2 s, before it expires. (A library
    # that dated it by refresh_after alone, 5 s, let it expire without a refresh.)
    for lru in (True, False):
        replay(
            RefreshMachine,
            f"decorate(maxsize=1, policy='ttl', lru={lru}); call(batch=['a']);"
            "release(fail=False, keep=False, pick=0, short=True); advance(seconds=3.0);"
            "call(batch=['a'])",
        )


def test_a_stale_value_served_is_not_refreshed_ahead_before_the_backoff() -> None:
    # 'a' expires, its recomputation fails and the stale value is served for the back-off; a
    # call within it gets that value without any computation. (A library that left the due time
    # of the expired entry as it was refreshed it at once.)
    replay(
        RefreshingPolicyMachine,
        "decorate(); call(key='a', outcome='short');"
        "call_a_little_later(key='a', outcome='remembered', seconds=4.0);"
        "call(key='a', outcome='short')",
    )


def test_an_async_caches_stale_value_served_is_not_refreshed_ahead_before_the_backoff() -> None:
    # The same with a plain async cache: the stale value served is kept (warned) in the cache
    # for the back-off, and neither its lookup nor the store dates it for an earlier refresh.
    replay(
        RefreshingAsyncPolicyMachine,
        "decorate(); call(key='a', outcome='short');"
        "call_a_little_later(key='a', outcome='remembered', step=4);"
        "call(key='a', outcome='short')",
    )


def test_an_async_caches_value_is_due_by_its_own_lifetime_not_the_stale_window() -> None:
    # A value living 3 s is kept 13 s by the async cache (with the stale window); it is due
    # after 1.5 s, half its own lifetime. (A library that dated it by the cache's 13 s found it
    # not due.)
    replay(
        RefreshingAsyncPolicyMachine,
        "decorate(); call(key='a', outcome='short');"
        "call_a_little_later(key='a', outcome='short', step=2)",
    )


def test_a_batch_keys_stale_value_served_is_not_refreshed_ahead_before_the_backoff() -> None:
    # The same for a key of a batch function: the due time of its expired entry must move with
    # the next attempt, or the stale value is refreshed at once.
    replay(
        BatchRefreshingPolicyMachine,
        "decorate(); call(key='a', outcome='short');"
        "call_a_little_later(key='a', outcome='remembered', seconds=4.0);"
        "call(key='a', outcome='short')",
    )


def test_each_key_of_a_batch_function_is_due_by_its_own_lifetime() -> None:
    # 'a' lives 3 s (due after 1.5 s), 'b' 20 s (due after 5 s): at 2 s only 'a' is refreshed
    # (to a value living 20 s, due at 7 s); at 6 s only 'b'. (A library that dated every key by
    # refresh_after alone refreshed neither at 2 s.)
    replay(
        BatchRefreshingPolicyMachine,
        "decorate(); call(key='a', outcome='short'); call(key='b', outcome='long');"
        "many(batch=['a'], outcome='long', step=3);"
        "many(batch=['a', 'b'], outcome='short', step=4)",
    )


def test_keys_due_together_are_refreshed_together() -> None:
    # Both due at 5 s: at 4 s neither is refreshed, at 5.5 s both, in one background batch.
    replay(
        BatchRefreshingPolicyMachine,
        "decorate(); call(key='a', outcome='long'); call(key='b', outcome='forever');"
        "many(batch=['a', 'b'], outcome='short', step=4);"
        "many(batch=['a', 'b'], outcome='skip', step=2)",
    )
