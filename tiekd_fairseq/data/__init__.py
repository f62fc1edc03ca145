"""What training and the tools read: data-bins, dictionaries, source-only shards, the teacher cache."""
