"""The scheduler on its own: hand-made sampled ids, a fake tokenizer, no torch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence as Ids

import pytest

from llmtree.engine.scheduler import Scheduler, SequenceOutput, StepPlan
from llmtree.engine.sequence import Sequence, SequenceStatus
from llmtree.protocol import SamplingParams

EOS = 0
VOCAB = {0: "<eos>", 1: "Hello", 2: " world", 3: "!", 4: " ST", 5: "OP", 6: " more", 7: "\n"}


def fake_decode(ids: Ids[int]) -> str:
    """Skips the EOS like ``skip_special_tokens``; ids >= 100 are one byte each of 'é' (2 bytes)."""
    text = ""
    pending = 0
    for token in ids:
        if token >= 100:
            pending += 1
            if pending == 2:
                text, pending = text + "é", 0
            continue
        if pending:
            text, pending = text + "\ufffd", 0
        text += "" if token == EOS else VOCAB.get(token, f"<{token}>")
    return text + ("\ufffd" if pending else "")


def make_scheduler(slots: int = 2, budget: int = 8) -> Scheduler:
    return Scheduler(
        max_num_seqs=slots, max_prefill_tokens=budget, eos_token_ids=[EOS], decode=fake_decode
    )


def make_seq(request_id: str, num_prompt: int = 3, **sampling: object) -> Sequence:
    params = SamplingParams(**{"max_tokens": 16, "temperature": 0.0, **sampling})  # type: ignore[arg-type]
    return Sequence(request_id, list(range(1, num_prompt + 1)), params)


def step(scheduler: Scheduler, tokens: dict[str, int]) -> tuple[StepPlan, list[SequenceOutput]]:
    """One step where each sampled request gets the token given for it (default 1)."""
    plan = scheduler.schedule()
    sampled = [tokens.get(seq.request_id, 1) for seq in plan.samples]
    return plan, scheduler.update_from_output(plan, sampled)


def by_id(outputs: list[SequenceOutput]) -> dict[str, SequenceOutput]:
    return {output.seq.request_id: output for output in outputs}


def test_importing_the_scheduler_does_not_import_torch() -> None:
    code = (
        "import sys, llmtree.engine.scheduler, llmtree.engine.sequence, "
        "llmtree.engine.detokenizer; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_admits_up_to_the_slots_and_queues_the_rest() -> None:
    scheduler = make_scheduler(slots=2, budget=100)
    seqs = [make_seq(f"r{i}") for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    plan = scheduler.schedule()
    assert [chunk.seq.request_id for chunk in plan.prefills] == ["r0", "r1"]
    assert [seq.slot for seq in seqs[:2]] == [0, 1]
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)
    assert seqs[2].status is SequenceStatus.WAITING
    scheduler.update_from_output(plan, [1, 1])
    plan = scheduler.schedule()
    assert [seq.request_id for seq in plan.decodes] == ["r0", "r1"]
    assert not plan.prefills
    assert scheduler.max_num_running_seen == 2


def test_prefill_budget_chunks_a_long_prompt_and_decodes_keep_going() -> None:
    scheduler = make_scheduler(slots=2, budget=4)
    short, long = make_seq("short", 2), make_seq("long", 10)
    scheduler.add(short)
    scheduler.add(long)
    plan, _ = step(scheduler, {})
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in plan.prefills] == [
        ("short", 0, 2),
        ("long", 0, 2),
    ]
    assert [seq.request_id for seq in plan.samples] == ["short"]
    plan, _ = step(scheduler, {})
    assert [seq.request_id for seq in plan.decodes] == ["short"]
    assert [(c.start, c.num_tokens) for c in plan.prefills] == [(2, 4)]
    plan, outputs = step(scheduler, {})
    assert [(c.start, c.num_tokens) for c in plan.prefills] == [(6, 4)]
    assert [seq.request_id for seq in plan.samples] == ["short", "long"]
    assert long.num_computed_tokens == 10 and long.output_ids == [1]
    assert len(outputs) == 2


def test_cancel_mid_batch_frees_the_slot_and_admits_the_next() -> None:
    scheduler = make_scheduler(slots=2, budget=100)
    for name in ("a", "b", "c"):
        scheduler.add(make_seq(name))
    step(scheduler, {})
    output = scheduler.cancel("a")
    assert output is not None and output.finish_reason == "cancelled"
    assert output.seq.is_finished and scheduler.num_running == 1
    plan = scheduler.schedule()
    assert [seq.request_id for seq in plan.decodes] == ["b"]
    assert [(c.seq.request_id, c.seq.slot) for c in plan.prefills] == [("c", 0)]
    assert scheduler.cancel("a") is None
    assert scheduler.cancel("nobody") is None


def test_cancel_of_a_waiting_request() -> None:
    scheduler = make_scheduler(slots=1)
    scheduler.add(make_seq("a"))
    scheduler.add(make_seq("b"))
    scheduler.schedule()
    output = scheduler.cancel("b")
    assert output is not None and output.finish_reason == "cancelled"
    assert scheduler.num_waiting == 0 and scheduler.num_running == 1


def test_a_sequence_cancelled_during_a_step_gets_no_more_output() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_seq("a"))
    plan = scheduler.schedule()
    scheduler.cancel("a")
    assert scheduler.update_from_output(plan, [1]) == []


def test_eos_ends_with_stop_and_its_text_is_not_shown() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_seq("a"))
    _, outputs = step(scheduler, {"a": 1})
    assert outputs[0].text == "Hello" and outputs[0].finish_reason is None
    _, outputs = step(scheduler, {"a": EOS})
    assert outputs[0].finish_reason == "stop"
    assert outputs[0].text == "" and outputs[0].token_ids == [EOS]
    assert scheduler.num_running == 0 and not scheduler.has_work


def test_max_tokens_ends_with_length() -> None:
    scheduler = make_scheduler()
    seq = make_seq("a", max_tokens=3)
    scheduler.add(seq)
    reasons = [step(scheduler, {})[1][0].finish_reason for _ in range(3)]
    assert reasons == [None, None, "length"]
    assert seq.num_output_tokens == 3


def test_min_tokens_and_ignore_eos_keep_going_past_eos() -> None:
    scheduler = make_scheduler()
    ignoring = make_seq("ignore", max_tokens=3, ignore_eos=True)
    scheduler.add(ignoring)
    reasons = [step(scheduler, {"ignore": EOS})[1][0].finish_reason for _ in range(3)]
    assert reasons == [None, None, "length"]
    minimum = make_seq("min", min_tokens=2, stop=["!"])
    scheduler.add(minimum)
    assert minimum.is_below_min_tokens  # the runner masks EOS while this holds
    _, outputs = step(scheduler, {"min": 3})
    assert outputs[0].text == "!" and outputs[0].finish_reason is None
    _, outputs = step(scheduler, {"min": 3})
    assert outputs[0].finish_reason == "stop" and outputs[0].text == ""
    assert not minimum.is_below_min_tokens


def test_stop_string_split_across_tokens_is_cut_and_never_shown() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_seq("a", stop=["STOP"]))
    texts = []
    for token in (1, 2, 4):
        _, outputs = step(scheduler, {"a": token})
        texts.append(outputs[0].text)
        assert outputs[0].finish_reason is None
    assert texts == ["Hello", " world", " "]  # "ST" is held back: it may start "STOP"
    _, outputs = step(scheduler, {"a": 5})
    assert outputs[0].finish_reason == "stop" and outputs[0].text == ""


def test_held_back_text_is_released_when_it_is_not_a_stop_string() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_seq("a", stop=["STOP"], max_tokens=3))
    texts = [step(scheduler, {"a": token})[1][0].text for token in (4, 6)]
    assert texts == [" ", "ST more"]
    _, outputs = step(scheduler, {"a": 4})
    assert outputs[0].finish_reason == "length" and outputs[0].text == " ST"


def test_broken_utf8_is_held_until_the_character_is_complete() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_seq("a"))
    texts = [step(scheduler, {"a": token})[1][0].text for token in (1, 100, 101, 3)]
    assert texts == ["Hello", "", "é", "!"]


def test_fail_ends_every_sequence_of_the_step_with_an_error() -> None:
    scheduler = make_scheduler(slots=3)
    for name in ("a", "b"):
        scheduler.add(make_seq(name))
    plan = scheduler.schedule()
    outputs = scheduler.fail(plan.sequences, "boom")
    assert {(o.seq.request_id, o.finish_reason, o.error) for o in outputs} == {
        ("a", "error", "boom"),
        ("b", "error", "boom"),
    }
    assert not scheduler.has_work and scheduler.num_free_slots == 3


def test_abort_all_ends_running_and_waiting() -> None:
    scheduler = make_scheduler(slots=1)
    for name in ("a", "b"):
        scheduler.add(make_seq(name))
    scheduler.schedule()
    assert set(by_id(scheduler.abort_all())) == {"a", "b"}
    assert not scheduler.has_work


def test_slots_are_reused_lowest_first() -> None:
    scheduler = make_scheduler(slots=3, budget=100)
    for name in ("a", "b", "c"):
        scheduler.add(make_seq(name))
    scheduler.schedule()
    scheduler.cancel("a")
    scheduler.cancel("b")
    scheduler.add(make_seq("d"))
    scheduler.schedule()
    assert scheduler.find("d") is not None and scheduler.find("d").slot == 0  # type: ignore[union-attr]


def test_same_seed_gives_the_same_random_stream() -> None:
    first, second = make_seq("a", seed=7), make_seq("b", seed=7)
    assert [first.rng.random() for _ in range(5)] == [second.rng.random() for _ in range(5)]
    assert make_seq("c").rng.random() != make_seq("d").rng.random()


def test_output_count_mismatch_is_an_error() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_seq("a"))
    plan = scheduler.schedule()
    with pytest.raises(ValueError):
        scheduler.update_from_output(plan, [])


def test_higher_priority_is_admitted_first_fifo_within_a_priority() -> None:
    scheduler = make_scheduler(slots=1, budget=100)
    scheduler.add(make_seq("busy"))
    scheduler.schedule()  # takes the only slot
    for name, priority in [("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5), ("mid", 1)]:
        seq = make_seq(name)
        seq.priority = priority
        scheduler.add(seq)
    assert [s.request_id for s in scheduler.waiting] == ["high1", "high2", "mid", "low1", "low2"]
    order = []
    for _ in range(5):
        running = scheduler.running[0]
        scheduler.cancel(running.request_id)
        plan = scheduler.schedule()
        order.append(plan.prefills[0].seq.request_id)
    assert order == ["high1", "high2", "mid", "low1", "low2"]


def test_negative_priority_waits_behind_the_default() -> None:
    scheduler = make_scheduler(slots=1)
    background = make_seq("background")
    background.priority = -3
    scheduler.add(background)
    scheduler.add(make_seq("normal"))
    plan = scheduler.schedule()
    assert [c.seq.request_id for c in plan.prefills] == ["normal"]


def test_a_request_waiting_past_the_queue_timeout_ends_with_queue_timeout() -> None:
    scheduler = make_scheduler(slots=1, budget=100)
    scheduler.add(make_seq("running"))
    scheduler.schedule()
    old, new = make_seq("old"), make_seq("new")
    scheduler.add(old)
    scheduler.add(new)
    assert scheduler.expire_waiting(10.0, now=old.arrival_s + 5) == []
    new.arrival_s = old.arrival_s + 8
    outputs = scheduler.expire_waiting(10.0, now=old.arrival_s + 11)
    assert [o.seq.request_id for o in outputs] == ["old"]
    assert outputs[0].finish_reason == "error" and outputs[0].code == "queue_timeout"
    assert outputs[0].error is not None and "queue_timeout" in outputs[0].error
    assert [s.request_id for s in scheduler.waiting] == ["new"]
    assert scheduler.num_running == 1  # running requests never time out in the queue


def test_a_failover_prefix_counts_as_answer_and_its_text_is_not_repeated() -> None:
    # the first placement produced "Hello world" (ids 1, 2) and was lost; the next one gets
    # them as a prefix: it prefills prompt + prefix and its first delta continues the text
    scheduler = make_scheduler(slots=1, budget=100)
    seq = Sequence("r", [7, 7, 7, 1, 2], SamplingParams(max_tokens=4, temperature=0.0))
    seq.prefix_len = 2
    scheduler.add(seq)
    assert seq.num_question_tokens == 3 and seq.num_answer_tokens == 2
    plan, outputs = step(scheduler, {"r": 3})
    assert [(c.start, c.num_tokens) for c in plan.prefills] == [(0, 5)]
    assert outputs[0].text == "!" and outputs[0].finish_reason is None
    _, outputs = step(scheduler, {"r": 6})
    assert outputs[0].text == " more" and outputs[0].finish_reason == "length"
    assert seq.num_answer_tokens == 4 and seq.output_ids == [3, 6]


def test_a_prefix_ending_in_half_a_character_is_completed_not_repeated() -> None:
    # "Hello" then the first byte of 'é' was streamed (the byte was held back)
    scheduler = make_scheduler(slots=1, budget=100)
    seq = Sequence("r", [7, 1, 100], SamplingParams(max_tokens=8, temperature=0.0))
    seq.prefix_len = 2
    scheduler.add(seq)
    _, outputs = step(scheduler, {"r": 101})
    assert outputs[0].text == "é"


def test_a_prefix_holding_back_a_stop_string_start_still_stops() -> None:
    scheduler = make_scheduler(slots=1, budget=100)
    params = SamplingParams(max_tokens=8, temperature=0.0, stop=[" STOP"])
    seq = Sequence("r", [7, 1, 4], params)  # " ST" was held back as a possible stop
    seq.prefix_len = 2
    scheduler.add(seq)
    _, outputs = step(scheduler, {"r": 5})
    assert outputs[0].text == "" and outputs[0].finish_reason == "stop"
