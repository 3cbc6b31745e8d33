"""ossrl.sandbox: run untrusted model-written Python in separate, limited processes (stdlib only)."""
