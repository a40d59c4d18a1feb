"""Render bench/results.json (written by bench/throughput.py) as bench/THROUGHPUT.md.

    .venv/bin/python bench/report.py [bench/results.json] [bench/THROUGHPUT.md]

Kept apart from the runner so the report's wording can be changed and re-rendered without a
ten-minute run. All numbers come from the JSON; the only prose computed here is arithmetic on them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _ms(latency: dict[str, Any] | None, key: str) -> str:
    value = (latency or {}).get(key)
    return "–" if value is None else (f"{value / 1000:.1f} s" if value >= 10_000 else f"{value:.0f} ms")


def _num(value: Any) -> str:
    return "–" if value is None else f"{value:g}"


def _pipeline_row(rate: str, answered: dict, handed: dict, ok_status: str) -> str:
    """One table row: the requests as the web answered them, then their messages reaching Twilio."""
    return (f"| {rate} | {_num(answered['achieved_send_rate'])} | {answered['ok']}/{answered['requests']} "
            f"| {_answers(answered['answers'], ok_status)} "
            f"| {_ms(answered['latency'], 'p50_ms')} | {_ms(answered['latency'], 'p99_ms')} "
            f"| {handed['delivered']}/{handed['expected']} "
            f"| {_num(handed.get('messages_per_second'))} | {_ms(handed.get('latency'), 'p50_ms')} "
            f"| {_ms(handed.get('latency'), 'p99_ms')} | {_num(handed.get('last_left_after_load_s'))} s |")


def _answers(answers: dict[str, int], ok: str) -> str:
    others = {k: v for k, v in answers.items() if k != ok}
    return ", ".join(f"{k}: {v}" for k, v in sorted(others.items())) or "none"


def write_report(results: dict[str, Any], path: Path) -> None:
    """Write the Markdown report for one run's ``results``."""
    m, s = results["machine"], results["settings"]
    latency = s["latency_ms"]
    procfile = s["procfile"]
    lines: list[str] = []
    add = lines.append
    add("# Throughput under open-loop load (bench/throughput.py)")
    add("")
    add(f"Run {m['date']} on {m['cpu_count']} cores ({m['platform']}), Python {m['python']}, commit "
        f"`{m['git_commit'][:10]}`{' with uncommitted changes' if m.get('git_dirty') else ''}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".")
    add("")
    add(f"Shape: the Procfile's lines as they are — `web: {procfile['web']}`, `worker: {procfile['worker']}` "
        f"(defaults: 2 gunicorn processes × 4 threads, 4 huey threads) — on PostgreSQL and Redis, local. "
        f"Twilio is the bundled simulator with **{latency:g} ms** of API latency per create, posting signed "
        f"status callbacks (sent, delivered, read; {s['callback_delay_s']} s apart) back to the webhook. "
        f"Load is open-loop: each rate is offered for {s['duration_s']:g} s on a fixed schedule whatever the "
        "server answers, and every latency is counted from the request's *scheduled* time. The load "
        "generator, the simulator, PostgreSQL and Redis share the same cores as the server, so these "
        "are floors for a dedicated host, not promises.")
    add("")
    add("Reproduce: `.venv/bin/python bench/throughput.py --latency-ms "
        f"{latency:g} --rates {','.join(map(str, s['rates']))} --duration {s['duration_s']:g}`")
    add("")

    add("## /notify: accepted, then handed to Twilio")
    add("")
    add("| offered /s | sent /s | 202s | other answers | 202 p50 | 202 p99 | handed to Twilio | msgs/s to Twilio | "
        "notify → Twilio p50 | p99 | last left after load |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for rate, r in results.get("notify", {}).items():
        add(_pipeline_row(rate, r["acceptance"], r["handed_to_twilio"], "202"))
    add("")

    add("## Conversation turns: signed inbound webhook → reply handed to Twilio")
    add("")
    add("Each request is a distinct opted-in contact writing `feedback`; the turn ends when the flow's first "
        "question reaches the simulator.")
    add("")
    add("| offered /s | sent /s | 200s | other answers | webhook p50 | webhook p99 | replies | turns/s | "
        "inbound → reply p50 | p99 | last left after load |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for rate, r in results.get("turns", {}).items():
        add(_pipeline_row(rate, r["inbound_webhook"], r["reply_handed_to_twilio"], "200"))
    add("")

    add("## Status callbacks (posted by the simulator during the runs above)")
    add("")
    add("Their rate follows the sends (three per message), so it is what the sender lets through, not an "
        "offered rate. Latency is the simulator's POST, answer included.")
    add("")
    add("| during | callbacks | per message | callbacks/s | non-200 | p50 | p99 |")
    add("|---|---|---|---|---|---|---|")
    for scenario in ("notify", "turns"):
        for rate, r in results.get(scenario, {}).items():
            c = r["status_callbacks"]
            if not c.get("count"):
                add(f"| {scenario} {rate}/s | 0 | | | | | |")
                continue
            add(f"| {scenario} {rate}/s | {c['count']} | {c['per_message']} | {c['per_second']} "
                f"| {_answers(c['answers'], '200')} | {_ms(c['latency'], 'p50_ms')} | {_ms(c['latency'], 'p99_ms')} |")
    add("")

    b = results.get("baselines")
    if b:
        add("## Baselines, same run, same gunicorn line")
        add("")
        add(f"`{b['command']}` serving bench/bare_app.py. *bare*: verify the signature, answer empty TwiML "
            "(the framework's ceiling). *naive*: verify, call `messages.create` inside the request (the "
            "tutorial design), answer. The bot's column is its inbound webhook from the turns runs.")
        add("")
        add("| offered /s | bare: sent /s | bare: 200/s | bare p50 | bare p99 | naive: 200/s | naive p50 | naive p99 "
            "| naive failures | bot webhook: 200/s | bot p50 | bot p99 |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for rate in sorted({*map(int, b["bare"]), *map(int, b["naive"])}):
            bare, naive = b["bare"].get(str(rate)), b["naive"].get(str(rate))
            bot = results.get("turns", {}).get(str(rate), {}).get("inbound_webhook")
            cells = [str(rate)]
            cells += ([_num(bare["achieved_send_rate"]), _num(bare["ok_per_second"]), _ms(bare["latency"], "p50_ms"),
                       _ms(bare["latency"], "p99_ms")] if bare else ["–"] * 4)
            cells += ([_num(naive["ok_per_second"]), _ms(naive["latency"], "p50_ms"), _ms(naive["latency"], "p99_ms"),
                       _answers(naive["answers"], "200")] if naive else ["–"] * 4)
            cells += ([_num(bot["ok_per_second"]), _ms(bot["latency"], "p50_ms"), _ms(bot["latency"], "p99_ms")]
                      if bot else ["–"] * 3)
            add("| " + " | ".join(cells) + " |")
        add("")

    rss = results.get("rss")
    if rss:
        add("## Peak resident memory (sampled every 0.5 s)")
        add("")
        add("| process tree | peak of the tree | per process |")
        add("|---|---|---|")
        for label, r in rss.items():
            per = ", ".join(f"{k} {v} MiB" for k, v in r["peak_rss_mib_by_process"].items())
            add(f"| {label} | {r['peak_rss_mib_tree']} MiB | {per} |")
        add("")
        add("The web tree is bash-exec'd gunicorn: its master plus the worker processes; the worker is one "
            "`huey_consumer` process with its threads.")
        add("")

    q = results.get("queries")
    if q:
        add("## SQL statements per operation")
        add("")
        add("| operation | statements |")
        add("|---|---|")
        add(f"| web: POST /notify | {q['web_per_notify_request']} |")
        add(f"| web: inbound webhook | {q['web_per_inbound_webhook']} |")
        add(f"| web: status callback | {q['web_per_status_callback']} |")
        add(f"| worker: one send (send_message task) | {q['worker_per_send']} |")
        tasks = ", ".join(f"{k}: {v['tasks']} × {v['per_task']}" for k, v in q["worker_per_turn_by_task"].items())
        add(f"| worker: one conversation turn (all its tasks: {tasks}) | {q['worker_per_turn']} |")
        add("")
        add(f"Counted, not estimated: {q['how']} ({q['operations']} of each).")
        add("")

    profiles = {k: v for r in results.get("notify", {}).values() for k, v in r.get("profile", {}).items()}
    errors = {k: v for r in results.get("notify", {}).values() for k, v in r.get("profile_errors", {}).items()}
    if profiles or errors:
        add(f"## Profile (py-spy, during /notify at {max(s['rates'])}/s)")
        add("")
        add("Flame graphs of on-CPU stacks: `bench/profile-worker.svg`, `bench/profile-web.svg`. Below, top frames "
            "of the raw stacks: *wall* includes idle threads (where the worker's threads spend their time), "
            "*cpu* only running ones. Percentages are of all samples.")
        add("")
        for label, top in sorted(profiles.items()):
            add(f"### {label.split(':')[0]} ({label.split(':')[2]}, {top['samples']} samples)")
            add("")
            add("| inclusive | frame | | self | frame |")
            add("|---|---|---|---|---|")
            for (fi, si), (fs, ss) in zip(top["inclusive"], top["self"]):
                add(f"| {si}% | `{fi}` | | {ss}% | `{fs}` |")
            add("")
        for label, err in errors.items():
            add(f"py-spy {label} failed: `{err.strip().splitlines()[-1] if err.strip() else 'no output'}`")
            add("")

    add("## What this says")
    add("")
    add(_reading(results))
    add("")
    add("## What is not covered, and how to read it")
    add("")
    add("- The simulator runs inside the load generator's process (its creates and callbacks are timed "
        "there); load generator, simulator, PostgreSQL, Redis, web and worker share the machine's cores.")
    add("- Status callbacks are not offered open-loop on their own: their rate is whatever the sender "
        "produces (three per send); an inbound message's reply also gets its three.")
    add("- Statement counts come from an in-process replay (same code, test client, tasks executed by hand), "
        "not from the gunicorn and huey processes themselves.")
    add("- py-spy samples at 25 Hz, non-blocking, for the whole /notify run at the top rate and its drain.")
    add("- Scenarios run one after another on the same stack. The wait between them covers the requests "
        "that were answered; a request the client gave up on (15 s) may still have been accepted by the "
        "server, and that backlog drains into the next scenario (e.g. /notify at the top rate into the "
        "first turns run, whose figures are then worse than the next rate's).")
    add("- One short run per rate: treat differences of a few tens of percent as noise.")
    add("")
    add("## Request-path latency")
    add("")
    add("The earlier closed-loop benchmark of the web process alone (no worker) is bench/http_latency.py; "
        "its report is [bench/REPORT.md](REPORT.md).")
    path.write_text("\n".join(lines) + "\n")


def _reading(results: dict[str, Any]) -> str:
    """The headline arithmetic, from the numbers only (no claim the data does not carry)."""
    latency_s = results["settings"]["latency_ms"] / 1000
    threads = 4  # the Procfile's WORKER_THREADS default
    notify = results.get("notify", {})
    best = max((r["handed_to_twilio"].get("messages_per_second") or 0 for r in notify.values()), default=0)
    ceiling = threads / latency_s if latency_s else float("inf")
    parts = [
        f"**Sender**: the worker handed at most {best:g} messages/s to Twilio. {threads} huey threads blocked "
        f"for one {latency_s * 1000:g} ms API round trip per send cap it at {threads} ÷ {latency_s:g} s = "
        f"{ceiling:.0f}/s even with free CPU and database; measured, each send occupies a thread for "
        f"{threads / best * 1000:.0f} ms ({threads} ÷ {best:g}/s), i.e. about "
        f"{threads / best * 1000 - latency_s * 1000:.0f} ms of database work, logging and CPU queueing on "
        "top of the API call (the worker profile's wall-clock view: time in `SocketIO.readinto` is the "
        "wait for Twilio, in psycopg's `Connection.wait` the wait for PostgreSQL). Everything offered "
        "above that rate becomes backlog in Redis: the notify → Twilio latency grows with the length of "
        "the run (\"last left after load\")." if best else "**Sender**: no message reached Twilio."]
    turns = results.get("turns", {})
    if turns:
        best_turns = max((r["reply_handed_to_twilio"].get("messages_per_second") or 0 for r in turns.values()),
                         default=0)
        parts.append(f"**Turns** share those threads and add the engine's task (process_inbound, then "
                     f"send_message): at most {best_turns:g} turns/s.")
    b = results.get("baselines") or {}
    rows = []
    for rate, bot in ((r, t["inbound_webhook"]) for r, t in turns.items()):
        bare = b.get("bare", {}).get(rate)
        if bare:
            rows.append(f"at {rate}/s the bare endpoint answers in {_ms(bare['latency'], 'p50_ms')} (p50) / "
                        f"{_ms(bare['latency'], 'p99_ms')} (p99), the bot's inbound webhook in "
                        f"{_ms(bot['latency'], 'p50_ms')} / {_ms(bot['latency'], 'p99_ms')}")
    if rows:
        top = max(b["bare"].values(), key=lambda r: r["ok_per_second"])
        parts.append("**Web**: on this 2-core machine, with the worker, PostgreSQL, Redis, the simulator and the "
                     "load generator all competing for the CPU, the web process is *not* answering in "
                     "milliseconds under these rates: " + "; ".join(rows) + f". The bare endpoint peaked at "
                     f"{top['ok_per_second']:g} req/s (offered {top['offered_rate']}/s), so the framework is "
                     "not the ceiling; the bot's own request path (its statements per request, above) and "
                     "the CPU it shares with the busy worker are. Caveat: the baselines ran after the backlog "
                     "had drained, with the worker idle, while the bot's webhook ran next to a busy worker. "
                     "Status callbacks time out (the simulator gives up after 5 s) when the web falls that "
                     "far behind.")
    if b.get("naive"):
        naive = ", ".join(f"{r['ok_per_second']:g}/s at {rate}/s offered (p99 {_ms(r['latency'], 'p99_ms')}, "
                          f"failures: {_answers(r['answers'], '200')})" for rate, r in b["naive"].items())
        parts.append(f"**Naive design** (Twilio inside the request): bounded by gunicorn's 2 × 4 threads ÷ "
                     f"{latency_s:g} s ≈ {8 / latency_s:.0f} req/s; measured {naive}. It holds every webhook "
                     "open for the whole API call, so past that rate Twilio's 15 s timeout is what answers.")
    return "\n\n".join(parts)


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("results.json")
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).with_name("THROUGHPUT.md")
    write_report(json.loads(source.read_text()), target)
