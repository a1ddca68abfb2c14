"""Built-in tasks: procedurally generated, exactly graded, with rationales."""
