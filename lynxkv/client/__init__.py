"""The Python client SDK (issue 4): async and sync clients, progressive fetch."""
