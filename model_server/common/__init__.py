"""Small helpers both halves share: atomic writes, backoff, URLs, process identity, which table and hosts.

Nothing here knows about the client or the launcher; both import from here.
"""
