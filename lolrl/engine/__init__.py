"""The engine: records, collation, losses, reference pass, value head, sampling, rewards, generation,
evaluation, config and the offline trainer. It imports no task family (see :class:`lolrl.engine.task.TaskInfo`)."""
