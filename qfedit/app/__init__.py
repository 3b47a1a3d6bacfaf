"""The application layer both front ends present: `schemas` (the shapes of models, facts,
batches, versions and the audit log, as the API serves them and the CLI prints them) and `views`
(database rows into those shapes). The CLI and the API import these; neither imports the other."""
