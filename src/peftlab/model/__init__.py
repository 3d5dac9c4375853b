"""Loading models (hub, folder, GGUF), reading their structure, and the forward changes training
makes to them on every device (lean MLP, norm outputs rebuilt in backward, the chunked output-head
loss)."""
