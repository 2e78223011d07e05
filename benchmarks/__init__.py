"""Hand-written pure-torch reference implementations and benchmark scripts."""
