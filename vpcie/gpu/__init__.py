"""The vGPU: the virtio-gpu device model, contexts, SUBMIT_3D forwarding, the lane
that serves lent sessions, fence page and capset, the binding to an agent."""
