"""Verifying bundles and Hub repos: digests, signatures and untrusted input."""
