"""Email through SendGrid's v3 API: build a mail, send it, read its Event Webhook, unsubscribe.

- `client`: the official `sendgrid` SDK's client, pointed at SENDGRID_API_URL, always with a timeout;
- `mail`: the v3 `mail/send` body (our message id in `custom_args`, RFC 8058 one-click headers);
- `sending`: one send → `bot.channels.outcomes` Accepted / Failed / Unknown;
- `copy`: the email copy (Jinja2: subject, text, autoescaped HTML) under templates/email/;
- `signature`: the Event Webhook's ECDSA signature, checked over the raw body;
- `webhook_events`: an event batch → normalized records mapped onto our statuses;
- `unsubscribe`: signed one-click unsubscribe tokens.

The facts these follow (what SendGrid answers, signs and repeats) are listed with their sources
in docs/ARCHITECTURE.md, "Email channel (pieces)".
"""
