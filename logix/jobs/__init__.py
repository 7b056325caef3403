"""The jobs behind the CLI: ``logix run`` / ``extract`` (:mod:`logix.jobs.attribution`) and
``logix contribute`` (:mod:`logix.jobs.contribution`)."""
