"""The demo world: deterministic from its seed, and every answer true of the scene it asks about."""

from __future__ import annotations

import numpy as np

from uniadapter_serve.model.demo.world import (
    COLORS,
    DIRECTIONS,
    FAMILY_SIZE,
    NUMBERS,
    SHAPES,
    World,
    caption_kind,
    question_kind,
)


def test_seeded_and_reproducible():
    a, b = World(seed=3), World(seed=3)
    assert a.scene(10) == b.scene(10) and a.scene(10) != World(seed=4).scene(10)
    assert np.array_equal(np.asarray(a.render(a.scene(10))), np.asarray(b.render(b.scene(10))))
    assert a.clip(5).caption() == b.clip(5).caption()


def test_answers_are_true_of_the_scene():
    world = World(seed=1)
    for i in range(200):
        scene = world.scene(i)
        by_shape = {s.shape: s for s in scene.shapes}
        for question, answer in scene.questions():
            words = question.split()
            if question.startswith("how many"):
                assert answer == NUMBERS[len(scene.shapes)]
            elif question.startswith("what colour is the"):
                assert by_shape[words[-1]].color == answer
            elif question.startswith("what shape is"):
                assert [s.shape for s in scene.shapes if s.color == words[-1]] == [answer]
            elif question.startswith("is there a"):
                assert (words[3] in {s.color for s in scene.shapes}) == (answer == "yes")
            elif question.endswith("left or right"):
                assert by_shape[words[2]].horizontal == answer


def test_pixels_show_the_scene():
    world = World(seed=2, image_size=64)
    scene = world.scene(0, num_shapes=1)
    shape = scene.shapes[0]
    image = np.asarray(world.render(scene)).astype(int)
    cx, cy = int(shape.x * 64), int(shape.y * 64)
    assert np.abs(image[cy, cx] - np.array(COLORS[shape.color])).max() < 30  # the shape's colour at its centre
    assert shape.shape in SHAPES


def test_clips_move_or_change():
    world = World(seed=5)
    for i in range(40):
        clip = world.clip(i)
        first, last = clip.frames[0].shapes[0], clip.frames[-1].shapes[0]
        if clip.event == "move":
            dx, dy = last.x - first.x, last.y - first.y
            moved = {"left": dx < -0.3, "right": dx > 0.3, "up": dy < -0.3, "down": dy > 0.3}
            assert moved[str(clip.direction)]
        else:
            assert first.color != last.color and last.color == clip.new_color


LAYOUT_WORDS = {"left", "right", "small", "large", "of", "on"}


def test_families_share_shapes_and_colours_and_differ_in_layout():
    """A family is what a shapes-and-colours reading cannot tell apart: same shapes and colours in every
    member, and retrieval captions that tell members apart."""
    world = World(seed=0)
    mixed = 0
    for family in range(30):
        scenes = [world.scene(family * FAMILY_SIZE + k) for k in range(FAMILY_SIZE)]
        assert {s.family for s in scenes} == {family}
        assert len({tuple(s.phrase() for s in scene.shapes) for scene in scenes}) == 1
        assert len({scene.pretrain_caption() for scene in scenes}) == 1
        mixed += len({scene.caption() for scene in scenes}) > 1
    assert mixed >= 28  # a family of 8 whose members all read the same is rare


def test_pretraining_captions_name_shapes_and_colours_only():
    world = World(seed=0)
    for i in range(300):
        scene = world.scene(i)
        words = set(scene.pretrain_caption().split())
        assert not words & LAYOUT_WORDS, scene.pretrain_caption()
        assert {s.shape for s in scene.shapes} | {s.color for s in scene.shapes} <= words
        assert words & LAYOUT_WORDS <= set(scene.caption().split())
        caption = scene.caption().split()
        if len(scene.shapes) == 1:  # a lone shape: its size and side
            s = scene.shapes[0]
            assert s.size in caption and s.horizontal == caption[-1]
        else:  # two: the first named is left of the second, or right of it, as drawn
            a, b = scene.shapes
            assert ("left" if a.x < b.x else "right") in caption


def test_ordered_pretraining_captions_name_the_shapes_left_to_right_in_the_same_words():
    """`pretrain_caption(ordered=True)`: the same words as the family's caption (no side, no relation), in the
    order the shapes stand from left to right, so family members whose shapes swap places read differently."""
    world = World(seed=0)
    swapped = 0
    for i in range(300):
        scene = world.scene(i)
        ordered = scene.pretrain_caption(ordered=True)
        assert sorted(ordered.split()) == sorted(scene.pretrain_caption().split())
        assert not set(ordered.split()) & LAYOUT_WORDS
        at = {f"a {s.phrase()}": s.x for s in scene.shapes}
        named = [at[phrase] for phrase in ordered.split(" and ")]
        assert named == sorted(named) and len(named) == len(scene.shapes)
        swapped += ordered != scene.pretrain_caption()
    assert swapped >= 50  # two-shape scenes whose family order is right to left


def test_every_question_and_caption_has_the_kind_its_answer_shows():
    """`question_kind` names each form the world asks (none is "other"), and each kind gets the answers of its
    kind (a side is left/right, a direction one of four, a colour a colour...); `caption_kind` tells a lone
    shape's side from a relation of two."""
    answers = {"count": set(NUMBERS), "side": {"left", "right"}, "presence": {"yes", "no"}, "shape": set(SHAPES),
               "colour": set(COLORS), "moving colour": set(COLORS), "first colour": set(COLORS),
               "new colour": set(COLORS), "direction": set(DIRECTIONS), "event": {"move", "change"}}
    world = World(seed=0)
    seen: set[str] = set()
    for i in range(200):
        scene, clip = world.scene(i), world.clip(i, 4)
        for question, answer in scene.questions() + clip.questions():
            kind = question_kind(question + "?")
            assert answer in answers[kind], (question, kind, answer)
            seen.add(kind)
        assert caption_kind(scene.caption()) == ("side" if len(scene.shapes) == 1 else "relation")
    assert seen == set(answers)
    assert question_kind("what is the meaning of this") == "other" and caption_kind("a red circle") == "other"
