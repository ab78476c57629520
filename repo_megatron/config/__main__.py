"""``python -m repo_megatron.config --reference [OUT]`` writes the config reference."""

import sys

from . import config_reference

if __name__ == "__main__":
    text = config_reference()
    args = [a for a in sys.argv[1:] if a != "--reference"]
    if args:
        with open(args[0], "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
