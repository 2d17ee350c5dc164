"""The contract both stages speak: view geometry and rendering (`views`, and `batch_render`:
the same render a batch at a time on any device, bit for bit), teacher specs (`teachers`),
and the cache format (`cache_format`)."""
