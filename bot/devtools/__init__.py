"""Development tools: the local Twilio simulator and the terminal chat.

The runtime never imports this package (create_app registers `flask chat` through Flask's
`flask.commands` entry point); a test proves it.
"""
