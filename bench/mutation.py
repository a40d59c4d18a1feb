"""A small mutation run over the checks that must not break quietly: the send claim, the lookup
and the lease, the status rank, which Twilio errors retry, the consent and window checks, and the
webhook's signature check.

Each mutant is one small change to a stable snippet of source (a comparison flipped, a condition
dropped). The script copies the tracked tree to a temporary directory once, applies one mutant at a
time there, runs the test files that guard that code (SQLite, stopping at the first failure), and
puts the file back. The working tree is never modified. A mutant whose snippet is not found
exactly once (the code was rewritten) is skipped and reported, never guessed at.

    .venv/bin/python bench/mutation.py                # all mutants, report to bench/MUTATION.md
    .venv/bin/python bench/mutation.py claim-lease    # only the named mutants, report to stdout
    .venv/bin/python bench/mutation.py --check        # only that every snippet is found once (seconds)

Not run by CI: about five minutes on two cores.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "bench" / "MUTATION.md"
#: One mutant's tests may not take longer than this (a mutant that hangs a test is killed).
RUN_TIMEOUT = 300
PER_TEST_TIMEOUT = 60

SENDER = "bot/delivery/sender.py"
CLAIMS = "bot/delivery/claims.py"
STATUSES = "bot/delivery/statuses.py"
WHATSAPP = "bot/channels/whatsapp/whatsapp.py"
CONSENT = "bot/conversations/consent.py"
CONTACTS = "bot/contacts.py"
AUTH = "bot/http/auth.py"
ERRORS = "bot/channels/whatsapp/errors.py"
WA_CHANNEL = "bot/channels/whatsapp/channel.py"
WA_LOOKUP = "bot/channels/whatsapp/lookup.py"

#: The tests that guard each file (what a change there must break).
GUARDS = {
    SENDER: ["tests/delivery/test_mutation_gaps.py", "tests/delivery/test_delivery.py", "tests/delivery/test_contact_order.py",
             "tests/conversations/test_consent_edges.py", "tests/delivery/test_unknown_fate.py", "tests/delivery/test_email_delivery.py",
             "tests/delivery/test_channel_seam.py"],
    CLAIMS: ["tests/delivery/test_mutation_gaps.py", "tests/delivery/test_delivery.py", "tests/delivery/test_contact_order.py",
             "tests/delivery/test_unknown_fate.py"],
    STATUSES: ["tests/delivery/test_mutation_gaps.py", "tests/delivery/test_delivery.py", "tests/http/test_webhook.py"],
    WHATSAPP: ["tests/delivery/test_mutation_gaps.py", "tests/http/test_notify_api.py", "tests/delivery/test_delivery.py",
               "tests/conversations/test_conversations.py"],
    CONSENT: ["tests/delivery/test_mutation_gaps.py", "tests/conversations/test_consent_edges.py", "tests/http/test_webhook.py",
              "tests/conversations/test_conversations.py"],
    CONTACTS: ["tests/delivery/test_mutation_gaps.py", "tests/conversations/test_consent_edges.py", "tests/http/test_webhook.py",
               "tests/conversations/test_conversations.py"],
    AUTH: ["tests/delivery/test_mutation_gaps.py", "tests/http/test_webhook.py", "tests/http/test_hardening.py",
           "tests/http/test_notify_api.py"],
    ERRORS: ["tests/delivery/test_mutation_gaps.py", "tests/delivery/test_delivery.py", "tests/delivery/test_unknown_fate.py"],
    WA_CHANNEL: ["tests/delivery/test_mutation_gaps.py", "tests/delivery/test_delivery.py", "tests/delivery/test_contact_order.py",
                 "tests/conversations/test_consent_edges.py"],
    WA_LOOKUP: ["tests/delivery/test_mutation_gaps.py", "tests/delivery/test_delivery.py", "tests/delivery/test_unknown_fate.py"],
}
#: Survivors that no test should kill, and why (reported beside the table).
ACCEPTED = {
    "claim-lease-boundary": "equivalent in practice: it differs only when the clock reads the lease's end "
                            "to the microsecond, and either answer is right then (the lease is over).",
}


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    snippet: str
    replacement: str
    why: str  # what the mutant would let through


MUTANTS = [
    # --- the claim (invariants 2 and 9) ---
    Mutant("claim-pending", CLAIMS, "of.status == MessageStatus.PENDING,", "of.status != MessageStatus.PENDING,",
           "a pending message is never claimed, anything else is"),
    Mutant("claim-retry-not-due", CLAIMS, "sa.and_(of.status == MessageStatus.RETRYING, due)",
           "of.status == MessageStatus.RETRYING", "a retrying message is claimed before its backoff is over"),
    Mutant("claim-early-ignored", CLAIMS, "due = sa.true() if early else of.next_attempt_at <= now",
           "due = of.next_attempt_at <= now", "the task's own retry cannot claim before the due time"),
    Mutant("claim-lease-ignored", CLAIMS, "sa.and_(of.status == MessageStatus.DISPATCHING, of.claimed_until < now)",
           "of.status == MessageStatus.DISPATCHING", "a message being sent is claimed again (double send)"),
    Mutant("claim-lease-boundary", CLAIMS, "of.claimed_until < now", "of.claimed_until <= now",
           "a lease is taken over at the very instant it ends"),
    Mutant("claim-order-ignored", CLAIMS, "sa.or_(of.kind == Kind.OPT_OUT_CONFIRMATION, ~_earlier_unsent_message(of, now))",
           "sa.true()", "a later message overtakes an earlier one of the same contact"),
    Mutant("claim-confirmation-waits", CLAIMS,
           "sa.or_(of.kind == Kind.OPT_OUT_CONFIRMATION, ~_earlier_unsent_message(of, now))",
           "~_earlier_unsent_message(of, now)", "an opt-out confirmation waits behind older messages"),
    Mutant("claim-order-reversed", CLAIMS, "sa.or_(prior.created_at < of.created_at,",
           "sa.or_(prior.created_at > of.created_at,", "newer messages hold older ones back"),
    # (the next five survived an independent run: issue 15)
    Mutant("unsent-retrying-ignored", CLAIMS, "prior.status.in_(UNSENT),",
           "prior.status.in_((MessageStatus.PENDING, MessageStatus.DISPATCHING)),",
           "a retrying message no longer holds its contact's later ones back"),
    Mutant("lookup-body-ignored", WA_LOOKUP, 'if sent_body and (candidate.body or "") != sent_body:', "if False:",
           "a lookup adopts another message to the same recipient and ours is never sent"),
    Mutant("lease-renewal-now", CLAIMS, ".values(claimed_until=now + self.lease)", ".values(claimed_until=now)",
           "a batch slower than its lease is re-taken while its calls are on the wire"),
    # --- the channel-neutral sender: retries, unknown fates, holds (invariant 2) ---
    Mutant("retry-limit-ignored", SENDER, "if transient and attempts < (max_attempts or MAX_ATTEMPTS):",
           "if transient:", "a transient failure is retried for ever, never failed with its last code"),
    Mutant("channel-attempt-limit-ignored", SENDER, "attempts < (max_attempts or MAX_ATTEMPTS)",
           "attempts < MAX_ATTEMPTS", "an unreachable handset (30003) is retried for hours, not once"),
    Mutant("unknown-sent-blind", SENDER, "fate.reason, transient=True,\n                                               unsure_since=fate.since)",
           "fate.reason, transient=True)", "a send whose answer was lost is sent again without a lookup"),
    Mutant("hold-counted", SENDER, "        if result.hold:\n            return _hold(row, result)\n", "",
           "SendGrid's 401 (credits exhausted) counts as attempts: a long outage fails the email instead of holding it"),
    # --- the status rank (invariant 3) ---
    Mutant("rank-equal-moves", STATUSES, 'Message.status_rank < sa.bindparam("rank")',
           'Message.status_rank <= sa.bindparam("rank")', "a status of the same rank replaces the one stored"),
    Mutant("rank-goes-back", STATUSES, 'Message.status_rank < sa.bindparam("rank")',
           'Message.status_rank != sa.bindparam("rank")', "a late callback moves the status backwards"),
    Mutant("error-dropped-when-status-stays", STATUSES, "    if error_code is not None or error_message:\n",
           "    if moved and (error_code is not None or error_message):\n",
           "a failed 63016 after read loses its error code"),
    # --- which Twilio errors retry ---
    Mutant("retry-500-excluded", ERRORS, "http_status == 429 or http_status >= 500",
           "http_status == 429 or http_status > 500", "a plain 500 (20500) fails a message for good"),
    # --- consent and the window in the send path (invariants 4 and 5) ---
    Mutant("refusal-confirmation-blocked", WA_CHANNEL, "if message.kind != Kind.OPT_OUT_CONFIRMATION:", "if True:",
           "the opt-out confirmation itself is refused"),
    Mutant("refusal-opted-out-sent", WA_CHANNEL, "if contact.consent == Consent.OPTED_OUT:\n            return OPTED_OUT_CODE",
           "if False:\n            return OPTED_OUT_CODE", "an opted-out contact is sent to"),
    Mutant("refusal-waiting-stop-ignored", WA_CHANNEL, "        if stop_waiting:\n", "        if False:\n",
           "a STOP stored but not yet processed does not hold sends back"),
    Mutant("refusal-window-ignored", WA_CHANNEL,
           "if message.content_sid is None and not within_window(contact.last_inbound_at):",
           "if False:", "free-form text is sent outside the 24-hour window"),
    Mutant("refusal-template-refused", WA_CHANNEL,
           "if message.content_sid is None and not within_window(contact.last_inbound_at):",
           "if not within_window(contact.last_inbound_at):", "an approved template is refused outside the window"),
    Mutant("window-boundary", WHATSAPP, "now - last_inbound_at < SESSION_WINDOW", "now - last_inbound_at <= SESSION_WINDOW",
           "free-form text at exactly 24 hours"),
    Mutant("window-never-wrote", WHATSAPP, "last_inbound_at is not None and now - last_inbound_at",
           "last_inbound_at is None or now - last_inbound_at", "a contact who never wrote counts as inside the window"),
    Mutant("window-48h", WHATSAPP, "SESSION_WINDOW = timedelta(hours=24)", "SESSION_WINDOW = timedelta(hours=48)",
           "a window twice as long"),
    # --- consent (invariant 4) ---
    Mutant("consent-waiting-stop-wrong-status", CONTACTS,
           "Message.status == MessageStatus.RECEIVED, Message.kind == Kind.OPT_OUT_REQUEST)",
           "Message.status == MessageStatus.PROCESSED, Message.kind == Kind.OPT_OUT_REQUEST)",
           "an unprocessed STOP is not seen as waiting"),
    Mutant("consent-no-change-recorded", CONSENT, "    if contact.consent == new_state:\n        return False\n",
           "", "a repeated opt-out or opt-in adds a ledger entry and reports a change"),
    Mutant("consent-action-swapped", CONSENT,
           "    if contact.consent == new_state:\n        return False\n"
           "    action = ConsentAction.OPT_OUT if new_state == Consent.OPTED_OUT else ConsentAction.OPT_IN",
           "    if contact.consent == new_state:\n        return False\n"
           "    action = ConsentAction.OPT_IN if new_state == Consent.OPTED_OUT else ConsentAction.OPT_OUT",
           "the ledger records the opposite action"),
    Mutant("consent-stop-keywords-ignored", CONSENT, "if typed_words(payload) in keywords.opt_out:",
           "if typed_words(payload) in keywords.opt_in:", "typed STOP is not an opt-out"),
    Mutant("consent-button-label-is-typed", CONSENT, '    if payload.get("ButtonPayload"):\n        return ""\n', "",
           "a quick-reply button labelled \"Cancel\" unsubscribes"),
    Mutant("consent-twilio-stop-ignored", CONSENT, '.upper() == "STOP":  # Twilio', '.upper() != "STOP":  # Twilio',
           "Twilio's Advanced Opt-Out (OptOutType=STOP) is ignored"),
    # --- the signature check (invariant 7) and the API token ---
    Mutant("signature-missing-accepted", AUTH, "    if not signature:\n        return False",
           "    if not signature:\n        return True", "a webhook without X-Twilio-Signature is accepted"),
    Mutant("signature-not-checked", AUTH, "    return any(hmac.compare_digest(", "    return True or any(hmac.compare_digest(",
           "any signature is accepted"),
    Mutant("signature-query-dropped", AUTH, 'if request.query_string and "?" not in configured:', "if False:",
           "the query string is left out of the signed URL"),
    Mutant("signature-configured-url-ignored", AUTH, "    return configured\n", "    return request.url\n",
           "TWILIO_WEBHOOK_URL is ignored: the signature is checked over the URL as requested"),
    Mutant("token-scheme-ignored", AUTH, 'scheme.lower() != "bearer" or ', "",
           "any Authorization scheme carrying the token is accepted"),
    Mutant("token-prefix-accepted", AUTH, "hmac.compare_digest(token.strip().encode(), expected.encode())",
           "expected.encode().startswith(token.strip().encode())", "a prefix of the token (even empty) is accepted"),
]


def copy_tree(target: Path) -> None:
    """The tracked files (and untracked new ones) of the working tree, without .git or .venv."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in files:
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_tests(tree: Path, tests: list[str]) -> tuple[str, float, str]:
    """("killed" | "survived" | "timeout", seconds, the first failing test)."""
    tests = [t for t in tests if (tree / t).exists()]
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("TEST_DATABASE_URL", None)
    env.pop("TEST_REDIS_URL", None)
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-x", "-q", "--no-header", "-rf",
             f"--timeout={PER_TEST_TIMEOUT}", *tests],
            cwd=tree, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - started, ""
    seconds = time.monotonic() - started
    failed = next((line.split(" ", 1)[1].split(" - ")[0] for line in result.stdout.splitlines()
                   if line.startswith(("FAILED tests/", "ERROR tests/"))), "")
    if result.returncode == 0:
        return "survived", seconds, ""
    if result.returncode == 1:
        return "killed", seconds, failed
    return "error", seconds, (result.stdout + result.stderr)[-300:]


def check_anchors() -> list[str]:
    """Mutants whose snippet is not found exactly once in their file (moved or rewritten code)."""
    problems = []
    for mutant in MUTANTS:
        path = ROOT / mutant.path
        found = path.read_text().count(mutant.snippet) if path.is_file() else -1
        if found != 1:
            where = "file missing" if found < 0 else f"snippet found {found} times"
            problems.append(f"{mutant.name}: {mutant.path}: {where}")
    return problems


def main(names: list[str]) -> int:
    if names == ["--check"]:
        problems = check_anchors()
        print("\n".join(problems) or f"all {len(MUTANTS)} mutants' snippets found once")
        return 1 if problems else 0
    chosen = [m for m in MUTANTS if not names or m.name in names]
    results = []
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        baseline, seconds, detail = run_tests(tree, sorted({t for m in chosen for t in GUARDS[m.path]}))
        print(f"baseline: {baseline} in {seconds:.0f}s", flush=True)
        if baseline != "survived":
            print(f"the unmutated tests do not pass ({detail}); no mutation run", file=sys.stderr)
            return 2
        for mutant in chosen:
            path = tree / mutant.path
            original = path.read_text()
            found = original.count(mutant.snippet)
            if found != 1:
                outcome = ("skipped", 0.0, "snippet not found" if found == 0 else f"snippet found {found} times")
            else:
                path.write_text(original.replace(mutant.snippet, mutant.replacement))
                try:
                    outcome = run_tests(tree, GUARDS[mutant.path])
                finally:
                    path.write_text(original)
            results.append((mutant, *outcome))
            print(f"{outcome[0]:9} {mutant.name:36} {outcome[1]:5.0f}s {outcome[2]}", flush=True)
    report = render(results)
    if names:
        print(report)
    else:
        REPORT.write_text(report)
        print(f"report: {REPORT.relative_to(ROOT)}")
    return 0


def render(results) -> str:
    counts = {status: sum(1 for r in results if r[1] == status) for status in ("killed", "timeout", "survived", "skipped", "error")}
    lines = [
        "# Mutation run",
        "",
        "`bench/mutation.py`: each mutant is one small change to the claim, the lookup, the lease, the",
        "status rank, the retry rule, the consent and window checks or the signature check; the tests",
        "guarding that file run on SQLite (`-x`) in a temporary copy of the tree. Killed: a test",
        "failed. Survived: every test passed, so nothing would catch that bug. Skipped: the snippet",
        "is no longer in the source.",
        "",
        f"Totals: {counts['killed'] + counts['timeout']} killed ({counts['timeout']} by a timeout), "
        f"{counts['survived']} survived, {counts['skipped']} skipped, {counts['error']} errors.",
        "",
        "| mutant | file | outcome | seconds | what it would let through | killed by |",
        "|---|---|---|---:|---|---|",
    ]
    for mutant, status, seconds, detail in results:
        lines.append(f"| {mutant.name} | {mutant.path} | **{status}** | {seconds:.0f} | {mutant.why} | "
                     f"{detail.replace('|', '/') if status != 'survived' else ''} |")
    accepted = [(m.name, ACCEPTED[m.name]) for m, status, _, _ in results if status == "survived" and m.name in ACCEPTED]
    if accepted:
        lines += ["", "Accepted survivors:", ""] + [f"- `{name}`: {why}" for name, why in accepted]
    lines += ["", "Run it: `.venv/bin/python bench/mutation.py` (all mutants, rewrites this file; a few minutes,",
              "not run by CI), or `.venv/bin/python bench/mutation.py <mutant> ...` (only those, to stdout)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
