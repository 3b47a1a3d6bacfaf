"""The read-only web console (`/ui`): see `api.console.pages`."""
