"""Edit batches as a pipeline of idempotent steps over the database and the checkpoint store.

submit      asking for a batch, a retraction, the nightly batch
settings    a model's settings (its `EditConfig` and how batches are judged) and overrides
lifecycle   a batch's statuses, the moves between them, the model's line, progress
steps       start a batch, capture a shard
captures    observation files in the store and the records of which fact is where
publish     solve, evaluate, record the version, move aliases
deliveries  each task's starts, so one that keeps killing its worker fails its batch
"""
