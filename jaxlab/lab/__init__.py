"""Labs: each (experiment, seed) of a lab as one ordinary run directory, trained by one or many
workers (`runner`), several of them started on one machine (`workers`)."""
