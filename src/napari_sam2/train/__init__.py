"""Fine-tuning SAM2 on annotated stacks: clips, prompt simulation, the loss, the loop."""
