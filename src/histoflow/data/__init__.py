"""The data step: download -> discovery (layouts, labels, patients, unreadable files) -> splits ->
images (the one preprocessing, shared with serving) -> pipeline (tf.data); `settings` and `step` run it."""
