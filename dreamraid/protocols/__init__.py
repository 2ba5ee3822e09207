"""The wire: frames and messages in, domain calls out.  Bytes live here and nowhere else."""
