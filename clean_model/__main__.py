import sys

from clean_model.transformer import main

sys.exit(main())
