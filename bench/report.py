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


def _header(add, *columns: str) -> None:
    """A Markdown table's header row and its separator."""
    add("| " + " | ".join(columns) + " |")
    add("|" + "---|" * len(columns))


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
    env = s.get("environment") or {}
    add(f"Shape: the Procfile's lines as they are — `web: {procfile['web']}`, `worker: {procfile['worker']}` "
        f"(their defaults; environment for web and worker: "
        + (", ".join(f"`{k}={v}`" for k, v in env.items()) or "none beyond the services")
        + ") — on PostgreSQL and Redis, local. "
        f"Twilio is the bundled simulator with **{latency:g} ms** of API latency per create, posting signed "
        f"status callbacks (sent, delivered, read; {s['callback_delay_s']} s apart) back to the webhook. "
        f"Load is open-loop: each rate is offered for {s['duration_s']:g} s on a fixed schedule whatever the "
        "server answers, and every latency is counted from the request's *scheduled* time. The load "
        "generator, the simulator, PostgreSQL and Redis share the same cores as the server, so these "
        "are floors for a dedicated host, not promises.")
    add("")
    add("Reproduce: `.venv/bin/python bench/throughput.py --latency-ms "
        f"{latency:g} --rates {','.join(map(str, s['rates']))} --duration {s['duration_s']:g}"
        + "".join(f" --set {k}={v}" for k, v in env.items()) + "`")
    add("")
    if results.get("error"):
        add(f"**This run stopped early** ({results['error']}); the sections below hold what it measured.")
        add("")
    _targets(results, add)
    _send_path(results, add)
    email_section(results, add)

    add("## /notify: accepted, then handed to Twilio")
    add("")
    _header(add, "offered /s", "sent /s", "202s", "other answers", "202 p50", "202 p99", "handed to Twilio",
            "msgs/s to Twilio", "notify → Twilio p50", "p99", "last left after load")
    for rate, r in results.get("notify", {}).items():
        add(_pipeline_row(rate, r["acceptance"], r["handed_to_twilio"], "202"))
    add("")

    add("## Conversation turns: signed inbound webhook → reply handed to Twilio")
    add("")
    add("Each request is a distinct opted-in contact writing `feedback`; the turn ends when the flow's first "
        "question reaches the simulator.")
    add("")
    _header(add, "offered /s", "sent /s", "200s", "other answers", "webhook p50", "webhook p99", "replies",
            "turns/s", "inbound → reply p50", "p99", "last left after load")
    for rate, r in results.get("turns", {}).items():
        add(_pipeline_row(rate, r["inbound_webhook"], r["reply_handed_to_twilio"], "200"))
    for label, r in (("two workers", (results.get("two_workers") or {}).get("turns")),
                     ("1M stored", (results.get("history") or {}).get("turns"))):
        if r:
            add(_pipeline_row(f"{r['inbound_webhook']['offered_rate']} ({label})", r["inbound_webhook"],
                              r["reply_handed_to_twilio"], "200"))
    add("")
    _cpu_split(results, add)

    add("## Status callbacks (posted by the simulator during the runs above)")
    add("")
    add("Their rate follows the sends (three per message), so it is what the sender lets through, not an "
        "offered rate. Latency is the simulator's POST, answer included.")
    add("")
    _header(add, "during", "callbacks", "per message", "callbacks/s", "non-200", "p50", "p99")
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
        _header(add, "offered /s", "bare: sent /s", "bare: 200/s", "bare p50", "bare p99", "naive: 200/s",
                "naive p50", "naive p99", "naive failures", "bot webhook: 200/s", "bot p50", "bot p99")
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
        _header(add, "process tree", "peak of the tree", "per process")
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
        _header(add, "operation", "statements")
        add(f"| web: POST /notify | {q['web_per_notify_request']} |")
        add(f"| web: inbound webhook | {q['web_per_inbound_webhook']} |")
        add(f"| web: status callback | {q['web_per_status_callback']} |")
        add(f"| worker: one send (send_message task) | {q['worker_per_send']} |")
        tasks = ", ".join(f"{k}: {v['tasks']} × {v['per_task']}" for k, v in q["worker_per_turn_by_task"].items())
        add(f"| worker: one conversation turn (all its tasks: {tasks}) | {q['worker_per_turn']} |")
        add("")
        add(f"Counted, not estimated: {q['how']} ({q['operations']} of each).")
        h = (results.get("history") or {}).get("queries")
        if h:
            add("")
            add(f"With {results['history']['seed']['messages_in_database']:,} messages stored: /notify "
                f"{h['web_per_notify_request']}, inbound webhook {h['web_per_inbound_webhook']}, status callback "
                f"{h['web_per_status_callback']}, send {h['worker_per_send']}, turn {h['worker_per_turn']} "
                "(the same statements, whatever the history).")
        add("")

    profiles = {k: v for r in results.get("notify", {}).values() for k, v in r.get("profile", {}).items()}
    profiles.update((results.get("backlog") or {}).get("profile", {}))
    errors = {k: v for r in results.get("notify", {}).values() for k, v in r.get("profile_errors", {}).items()}
    if profiles or errors:
        add(f"## Profile (py-spy: the sender draining the backlog; web and worker during /notify at {max(s['rates'])}/s)")
        add("")
        add("Flame graphs of on-CPU stacks: `bench/profile-sender.svg` (the backlog), `bench/profile-worker.svg`, "
            "`bench/profile-web.svg` (/notify). Below, top frames of the raw stacks: *wall* includes idle threads "
            "(where the threads spend their time), *cpu* only running ones (py-spy counts a thread waiting for "
            "the GIL or in a C call as running). Percentages are of all samples. The CPU per send in the "
            "send-path table comes from /proc, not from these samples.")
        add("")
        for label, top in sorted(profiles.items()):
            add(f"### {label.split(':')[0]} ({label.split(':')[2]}, {top['samples']} samples)")
            add("")
            _header(add, "inclusive", "frame", "", "self", "frame")
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
    add("- py-spy samples at 25 Hz, non-blocking, for the whole /notify run at the top rate and its drain, "
        "and for 20 s of the backlog.")
    add("- *Busiest second* counts creates by their arrival at the simulator, which runs in the load "
        "generator's process on the same saturated cores: a request that took its slot in the shared "
        "budget can arrive hundreds of milliseconds later, next to the next second's. The budget "
        "itself is the `limits` library's moving window in Redis (its two-process test: "
        "`tests/delivery/test_rate_limit.py::test_two_workers_share_one_budget_through_redis`).")
    add("- *Machine cores busy* far above the sum of the parts (worker, PostgreSQL, Redis, load generator) "
        "means something outside the measured processes held the CPU during that drain; such a row measures "
        "the machine more than the sender. Each scenario starts only once the machine is idle "
        "(`busy_cores_before` in results.json).")
    add("- 429s: the simulator does not enforce a rate, so \"no 429s\" cannot be observed here; what is "
        "measured is the rate the sender kept (the two-worker rate-limit row).")
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
    path.write_text("\n".join(lines) + "\n" + hand_written(path))


#: Everything after this line in THROUGHPUT.md is written by hand (or by other benchmarks:
#: bench/web_cpu.py, bench/worker_cpu.py) and kept when the report is rendered again.
HAND_WRITTEN_MARKER = "<!-- Hand-written below: bench/report.py keeps everything after this line. -->"


def hand_written(path: Path) -> str:
    """The hand-written tail of the report at `path` (from HAND_WRITTEN_MARKER on), or ''."""
    if not path.exists():
        return ""
    text = path.read_text()
    at = text.find(HAND_WRITTEN_MARKER)
    return "" if at < 0 else "\n" + text[at:]


def _reading(results: dict[str, Any]) -> str:
    """The headline arithmetic, from the numbers only (no claim the data does not carry)."""
    parts = []
    one = results.get("backlog") or {}
    two = (results.get("two_workers") or {}).get("backlog") or {}
    if one.get("messages_per_second"):
        parts.append(
            f"**Sender**: one worker process handed {_num(one['messages_per_second'])} messages/s to Twilio "
            f"draining a backlog ({_num(one.get('worker_cpu_ms_per_send'))} ms of worker CPU per send, the "
            f"worker using {_num(one.get('cores', {}).get('worker'))} of a core: a Python process runs on one core at "
            "a time, so that is its ceiling)"
            + (f"; two worker processes {_num(two['messages_per_second'])}/s, with "
               f"{_num(two.get('cores', {}).get('machine'))} of the machine's 2 cores busy in all (the simulator and the "
               "load generator share them)." if two.get("messages_per_second") else ".")
            + " The sends in flight are not the limit any more (SEND_CONCURRENCY calls wait on Twilio at once, "
            "holding no database connection); CPU per send is. In the sender's profile the Twilio calls on the "
            "pool (`in_flight._run`: the twilio SDK and requests) and huey's task execution (`Huey.execute`, "
            "most of whose tasks find their message already sent by a batch) hold most samples; the batch "
            "statements are 1.3 per send (the table below). More throughput takes more worker processes on "
            "more cores, which the rate limit and SKIP LOCKED claims already allow.")
    turns = results.get("turns", {})
    if turns:
        best = max((r["reply_handed_to_twilio"].get("messages_per_second") or 0 for r in turns.values()), default=0)
        parts.append(f"**Turns**: at most {best:g} turns/s with one worker, three status callbacks per reply "
                     "flowing into the same web. A turn costs the engine's statements (the table above) on top "
                     "of its send; the CPU split shows where the two cores go.")
    b = results.get("baselines") or {}
    if b.get("bare") and turns:
        top = max(b["bare"].values(), key=lambda r: r["ok_per_second"])
        rows = []
        for rate, t in turns.items():
            bare = b["bare"].get(rate)
            if bare:
                bot = t["inbound_webhook"]
                rows.append(f"at {rate}/s the bare endpoint answers in {_ms(bare['latency'], 'p50_ms')} / "
                            f"{_ms(bare['latency'], 'p99_ms')} (p50 / p99), the bot's webhook in "
                            f"{_ms(bot['latency'], 'p50_ms')} / {_ms(bot['latency'], 'p99_ms')}")
        parts.append("**Web**: " + "; ".join(rows) + f". The bare endpoint peaked at {top['ok_per_second']:g} req/s "
                     f"(offered {top['offered_rate']}/s) with the worker idle; the bot's webhook runs its "
                     "statements and shares the cores with a busy worker, PostgreSQL, the simulator and the "
                     "load generator.")
    if b.get("naive"):
        latency_s = results["settings"]["latency_ms"] / 1000
        naive = ", ".join(f"{r['ok_per_second']:g}/s at {rate}/s offered (p99 {_ms(r['latency'], 'p99_ms')}, "
                          f"failures: {_answers(r['answers'], '200')})" for rate, r in b["naive"].items())
        parts.append(f"**Naive design** (Twilio inside the request): bounded by gunicorn's 2 × 4 threads ÷ "
                     f"{latency_s:g} s ≈ {8 / latency_s:.0f} req/s; measured {naive}.")
    return "\n\n".join(parts)


def _send_path(results: dict[str, Any], add) -> None:
    rows = [("one worker", results.get("backlog")),
            ("two workers", (results.get("two_workers") or {}).get("backlog")),
            ("one worker, 1M messages stored", (results.get("history") or {}).get("backlog"))]
    limited = (results.get("two_workers") or {}).get("rate_limit")
    if not any(r for _, r in rows) and not limited:
        return
    add("## The send path on its own: a backlog drained (status callbacks off)")
    add("")
    add("Pending messages to distinct contacts, their send tasks on the queue (what a burst of /notify leaves "
        "behind), drained by the `worker` line(s). *msgs/s*: all of them over the time from the first enqueue "
        "to the last create at the simulator; *steady*: between the first and the last create. Worker CPU "
        "from /proc (user + system), cores = CPU seconds ÷ wall seconds.")
    add("")
    _header(add, "run", "messages", "msgs/s to Twilio", "steady", "busiest second", "worker CPU per send",
            "worker cores", "machine cores busy")
    for label, r in rows + [(f"two workers at TWILIO_MESSAGES_PER_SECOND={limited['setting']}" if limited else "",
                             limited)]:
        if not r or not r.get("handed_to_twilio"):
            continue
        add(f"| {label} | {r['handed_to_twilio']}/{r['size']} | {_num(r.get('messages_per_second'))} "
            f"| {_num(r.get('steady_messages_per_second'))} | {_num(r.get('busiest_second'))} "
            f"| {_num(r.get('worker_cpu_ms_per_send'))} ms "
            f"| {_num(r.get('cores', {}).get('worker'))} | {_num(r.get('cores', {}).get('machine'))} |")
    add("")


def email_section(results: dict[str, Any], add) -> None:
    """Email beside WhatsApp (bench/throughput.py's `email` scenario), when the run had it."""
    e = results.get("email")
    if not e:
        return
    alone, mail, mixed = e.get("whatsapp_alone") or {}, e.get("email_alone") or {}, e.get("whatsapp_with_email_queued") or {}
    ratio = e.get("whatsapp_ratio_with_email_queued")
    add("## Email beside WhatsApp: backlogs drained alone and together (callbacks and events off)")
    add("")
    add(f"One `worker` line. SendGrid is the simulator's SendGrid side answering `mail/send` in "
        f"**{e['sendgrid_latency_ms']} ms** (the official `sendgrid` SDK, a new connection per request); Twilio "
        "the same simulator at the run's latency. *sends/s*: all of them over the time from the first enqueue to "
        "the last arrival at the simulator; *steady*: between the first and the last arrival. Worker CPU from /proc.")
    add("")
    _header(add, "run", "sent", "sends/s", "steady", "worker CPU per send", "worker cores", "machine cores busy")
    add(f"| WhatsApp backlog alone | {alone.get('handed_to_twilio')}/{alone.get('size')} "
        f"| {_num(alone.get('messages_per_second'))} | {_num(alone.get('steady_messages_per_second'))} "
        f"| {_num(alone.get('worker_cpu_ms_per_send'))} ms | {_num((alone.get('cores') or {}).get('worker'))} "
        f"| {_num((alone.get('cores') or {}).get('machine'))} |")
    add(f"| email backlog alone | {mail.get('sent')}/{mail.get('size')} | {_num(mail.get('sends_per_second'))} "
        f"| {_num(mail.get('steady_sends_per_second'))} | {_num(mail.get('worker_cpu_ms_per_send'))} ms "
        f"| {_num((mail.get('cores') or {}).get('worker'))} | {_num((mail.get('cores') or {}).get('machine'))} |")
    add(f"| WhatsApp backlog, {e['email_backlog']} emails queued ahead | {mixed.get('sent')}/{mixed.get('size')} "
        f"| {_num(mixed.get('sends_per_second'))} | {_num(mixed.get('steady_sends_per_second'))} "
        f"| {_num(mixed.get('worker_cpu_ms_per_send_both'))} ms (both channels) "
        f"| {_num((mixed.get('cores') or {}).get('worker'))} | {_num((mixed.get('cores') or {}).get('machine'))} |")
    add("")
    if ratio is not None:
        add(f"**Email must not slow WhatsApp** (target ≥ 0.9×): the WhatsApp drain with the email backlog queued "
            f"ahead of it ran at **{ratio:g}×** its rate alone ({'met' if ratio >= 0.9 else '**not met**'}; between "
            f"its own first and last create, {_num(e.get('whatsapp_steady_ratio_with_email_queued'))}×); "
            f"{mixed.get('emails_sent_meanwhile')} of the {e['email_backlog']} emails had left by the time the last "
            f"WhatsApp message did (emails at {_num(mixed.get('email_sends_per_second'))}/s over the whole mixed run).")
        add("")


def _cpu_split(results: dict[str, Any], add) -> None:
    runs = [(f"/notify {rate}/s", r.get("cores_during_load")) for rate, r in results.get("notify", {}).items()]
    runs += [(f"turns {rate}/s", r.get("cores_during_load")) for rate, r in results.get("turns", {}).items()]
    runs = [(label, cores) for label, cores in runs if cores]
    if not runs:
        return
    parts = ["web", "worker", "postgresql", "redis", "load generator + simulator", "machine", "steal"]
    if any("simulator" in cores for _, cores in runs):  # --simulator-process: each apart
        parts[4:5] = ["load generator", "simulator"]
    add("### Where the two cores went during the load (cores used on average)")
    add("")
    _header(add, "run", *parts)
    for label, cores in runs:
        add(f"| {label} | " + " | ".join(_num(cores.get(p)) for p in parts) + " |")
    add("")


def _targets(results: dict[str, Any], add) -> None:
    """Issue 8's targets beside the figures of this run."""
    rows: list[tuple[str, str, str]] = []

    def row(target: str, figure: str, met: bool | None) -> None:
        rows.append((target, figure, "–" if met is None else ("met" if met else "**not met**")))

    one = results.get("backlog") or {}
    two = (results.get("two_workers") or {}).get("backlog") or {}
    best = max(one.get("messages_per_second") or 0, two.get("messages_per_second") or 0)
    if best:
        row("send path ≥ 400 msg/s (TWILIO_MESSAGES_PER_SECOND=1000, callbacks off)",
            f"{_num(one.get('messages_per_second'))}/s one worker, {_num(two.get('messages_per_second'))}/s two",
            best >= 400)
    limited = (results.get("two_workers") or {}).get("rate_limit") or {}
    if limited.get("steady_messages_per_second"):
        rate, setting = limited["steady_messages_per_second"], limited["setting"]
        row(f"TWILIO_MESSAGES_PER_SECOND={setting}: within ±10% across two worker processes",
            f"{rate:g}/s from the first create to the last (busiest second at the simulator: "
            f"{limited.get('busiest_second')}, see below)", abs(rate - setting) <= 0.1 * setting)
    turns = results.get("turns", {})
    if turns:
        best_turns = max((r["reply_handed_to_twilio"].get("messages_per_second") or 0 for r in turns.values()), default=0)
        row("≥ 150 turns/s with callbacks flowing", f"{best_turns:g}/s", best_turns >= 150)
        for rate, bound in (("80", 1000), ("200", 2000)):
            r = turns.get(rate)
            if r:
                p99 = (r["reply_handed_to_twilio"].get("latency") or {}).get("p99_ms")
                row(f"inbound → reply p99 < {bound // 1000} s at {rate} turns/s offered", _ms({"p": p99}, "p"),
                    p99 is not None and p99 < bound)
    bare = (results.get("baselines") or {}).get("bare") or {}
    for rate, r in turns.items():
        w, b = r["inbound_webhook"], bare.get(rate)
        p99 = (w.get("latency") or {}).get("p99_ms")
        ratio = (w["ok_per_second"] / b["ok_per_second"]) if b and b["ok_per_second"] else None
        row(f"inbound webhook at {rate}/s: p99 < 100 ms, ≥ 0.4× bare", f"p99 {_ms(w.get('latency'), 'p99_ms')}, "
            f"{w['ok_per_second']:g}/s = {ratio:.2f}× bare" if ratio else f"p99 {_ms(w.get('latency'), 'p99_ms')}",
            p99 is not None and p99 < 100 and (ratio or 0) >= 0.4)
    for scenario in ("notify", "turns"):
        for rate, r in results.get(scenario, {}).items():
            c = r.get("status_callbacks") or {}
            if c.get("count"):
                p99 = (c.get("latency") or {}).get("p99_ms")
                row(f"status callbacks during {scenario} {rate}/s: p99 < 100 ms", f"{c['per_second']:g}/s, p99 "
                    f"{_ms(c.get('latency'), 'p99_ms')}, non-200: {_answers(c['answers'], '200')}",
                    p99 is not None and p99 < 100)
    row("≥ 1,000 req/s into the webhook", "not offered in this run (rates above)", None)
    history = results.get("history") or {}
    if history.get("backlog") and one.get("messages_per_second"):
        ratio = history["backlog"]["messages_per_second"] / one["messages_per_second"]
        row("1M stored: send path ≥ 0.9× empty", f"{ratio:.2f}×", ratio >= 0.9)
    if history.get("turns") and turns:
        top = str(max(map(int, turns)))
        empty = turns[top]["reply_handed_to_twilio"].get("messages_per_second") or 0
        full = history["turns"]["reply_handed_to_twilio"].get("messages_per_second") or 0
        if empty:
            row(f"1M stored: turns at {top}/s ≥ 0.9× empty", f"{full:g} vs {empty:g}/s = {full / empty:.2f}×",
                full / empty >= 0.9)
    q, hq = results.get("queries"), history.get("queries")
    if q and hq:
        row("1M stored: statements per turn constant", f"{q['worker_per_turn']} → {hq['worker_per_turn']}",
            q["worker_per_turn"] == hq["worker_per_turn"])
    rss = results.get("rss") or {}
    web = [v for k, v in (rss.get("web") or {}).get("peak_rss_mib_by_process", {}).items() if k != "master"]
    if web:
        row("RSS web ≤ 80 MB per process", f"{max(web):g} MiB", max(web) <= 80)
    if rss.get("worker"):
        worker = rss["worker"]["peak_rss_mib_tree"]
        row("RSS worker ≤ 150 MB", f"{worker:g} MiB", worker <= 150)
    if not rows:
        return
    add("## Targets (issue 8) and this run's figures")
    add("")
    _header(add, "target", "measured", "")
    for target, figure, met in rows:
        add(f"| {target} | {figure} | {met} |")
    add("")


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("results.json")
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).with_name("THROUGHPUT.md")
    write_report(json.loads(source.read_text()), target)
