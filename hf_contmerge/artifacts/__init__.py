"""What a step leaves behind: the folder layout and file names, the state schema, the step folder
(assembled, read back, loaded), task heads, the model card, and the PEFT adapter export."""
