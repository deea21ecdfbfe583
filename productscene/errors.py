class ProductSceneError(ValueError):
    """The one error type of ProductScene. Its message names the input at fault and what was
    expected, in words for the person who set up the graph or ran the command."""
