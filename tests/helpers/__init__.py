"""Test helpers: tiny models, shared real engines and servers, the attribution oracle."""
