"""HTTP routers, one per feature: thin functions over the service objects in `server/`."""
