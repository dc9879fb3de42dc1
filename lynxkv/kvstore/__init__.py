"""The standalone async KV server (issue 3): aiohttp routes, storage backends, metrics."""
