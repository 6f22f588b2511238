"""Triton implementations; importing this package imports triton."""
