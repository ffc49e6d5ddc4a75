"""The prompt-echo share of descriptions (`shared.echo_share`), by hand."""

from mllm.course.shared import echo_share


def test_echo_share_counts_descriptions_with_a_question_mark():
    descriptions = ["A small red moon is in the top left.",
                    "A small red moon is in the image? answer in the image?",  # two marks, one description
                    "The image shows two objects on a light background.",
                    "A large blue star is in the image?"]
    assert echo_share(descriptions) == 0.5
    assert echo_share([]) == 0.0
