"""The router: rules that decide where a pushed study goes (forward, annotate, ingest), the
durable outbox that delivers it, and the listener's record of which studies are stable."""
