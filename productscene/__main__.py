import sys

if sys.argv[1:2] == ["batch"]:  # the batch client needs none of the training commands' imports (torch)
    from .batch.command import main as batch_main
    sys.exit(batch_main(sys.argv[2:]))

from .cli import main

sys.exit(main())
