"""The contract both stages speak: view geometry and rendering (`views`), teacher specs
(`teachers`), and the cache format (`cache_format`)."""
