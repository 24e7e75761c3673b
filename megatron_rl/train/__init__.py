"""Training on megatron-core: the engine (model, optimizer, schedules) and the LM job."""
