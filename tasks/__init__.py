"""SeqIO task and mixture registrations (installed as `ift_jax.tasks`).

Importing this package registers every task and mixture. Registration reads
no files: `ift-jax tasks list` works anywhere, and a task whose files are
missing fails only when used, naming the path it expected.
"""

from ift_jax.tasks import (  # noqa: F401  (imported for their registrations)
    amazon_reviews,
    bbh,
    dialogsum,
    glue,
    mmlu,
    multi30k,
    samsum,
    synthetic,
    t0,
    wnut17,
)
from ift_jax.tasks import mixtures  # noqa: F401  (after the tasks it mixes)
from ift_jax.tasks import study_mixtures  # noqa: F401  (after mixtures, whose lists it uses)
